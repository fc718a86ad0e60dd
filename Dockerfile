# The mirror's image: docker build -t mirror . (see README, "Run it in a container").
# BASE: any Debian-like image with python3 >= 3.11 and its venv module, e.g. a bookworm made with
# mmdebstrap where no registry is reachable (what tests/e2e/test_image.py builds on).
ARG BASE=python:3.11-slim
FROM ${BASE}

# The data volume's mount point belongs to the user: a named volume starts as a copy of it.
RUN groupadd --system --gid 10001 mirror \
 && useradd --system --uid 10001 --gid mirror --home-dir /var/lib/mirror --no-create-home mirror \
 && mkdir -p /var/lib/mirror /etc/mirror \
 && chown mirror:mirror /var/lib/mirror

COPY pyproject.toml /src/
COPY mirror /src/mirror
COPY config /src/config
RUN python3 -m venv /opt/mirror \
 && /opt/mirror/bin/pip install --no-cache-dir --disable-pip-version-check /src \
 && rm -rf /src
COPY config/mirror.yml /etc/mirror/config.yml
COPY docker/healthcheck.py /opt/mirror/healthcheck.py

ENV PATH=/opt/mirror/bin:$PATH PYTHONUNBUFFERED=1
USER mirror
VOLUME /var/lib/mirror
EXPOSE 5000
# The first check runs one interval after the start.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/mirror/bin/python", "/opt/mirror/healthcheck.py"]
# Exec form, no shell: the server is PID 1 and gets docker stop's SIGTERM itself.
ENTRYPOINT ["/opt/mirror/bin/mirror"]
CMD ["serve", "--config", "/etc/mirror/config.yml"]
