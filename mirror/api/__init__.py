"""The v2 API: the route table (table.py, endpoints.py) and one handler module per area."""
