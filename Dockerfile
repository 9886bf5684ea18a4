# One image for workers, Flower and the CLI. Storage credentials come from the environment at
# run time (env_file or an orchestrator's secrets), never from the image.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends age zstd \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY coordinator ./coordinator
COPY tasks ./tasks
COPY workers ./workers
COPY storage ./storage
RUN pip install --no-cache-dir . && useradd --system --uid 10001 cloud-dump
USER cloud-dump
ENTRYPOINT ["cloud-dump"]
CMD ["--help"]
