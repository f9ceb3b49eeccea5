# One image for every nbdweb process: web (gunicorn), celery, nbdworker.
# /data is the data dir; /srv/nbd the images of a storage node that has a volume of its own
# (docker-compose.yml's node2): a named volume mounted on either starts owned by nbdweb.
FROM debian:12-slim

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NBDWEB_DATA_DIR=/data \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /data --uid 10809 nbdweb \
 && mkdir -p /data/images /srv/nbd && chown -R nbdweb:nbdweb /data /srv/nbd

COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

WORKDIR /app
COPY . /app
# The `nbdweb` command-line client (docker compose exec web nbdweb ...).
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf build
USER nbdweb
EXPOSE 8000 10809
CMD ["python", "-m", "gunicorn", "-c", "nbdweb/gunicorn.conf.py", "nbdweb.wsgi"]
