FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /var/lib/mirror --create-home mirror
WORKDIR /src
COPY pyproject.toml README.md ./
COPY config ./config
COPY mirror ./mirror
RUN pip install --no-cache-dir . && rm -rf /src && mkdir -p /etc/mirror
COPY config/mirror.yml /etc/mirror/config.yml

USER mirror
VOLUME /var/lib/mirror
EXPOSE 5000
ENTRYPOINT ["mirror"]
CMD ["serve", "--config", "/etc/mirror/config.yml"]
