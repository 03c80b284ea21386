# tokenmill image for the deployed stack (docker-compose.yml).
# Build arg VLLM selects the engine build: "vllm" (CUDA, default) or "cpu".
# No secret goes into the image: passwords arrive as environment variables at run time,
# the config (API key digests, webhook secrets) as a compose secret file
# (TOKENMILL_CONFIG=/run/secrets/tokenmill.toml). Only code and the example config
# (which the services refuse to use once external URLs are set) are copied in.
FROM python:3.11-slim
ARG VLLM=vllm
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY tokenmill tokenmill
COPY producers producers
COPY scheduler scheduler
COPY workers workers
COPY ledger ledger
COPY config config
COPY gateway gateway
# click<8.4: faust-streaming's pin (see the Makefile).
RUN pip install --no-cache-dir ".[${VLLM},postgres]" && pip install --no-cache-dir "click>=8.1,<8.4"
# An unprivileged user owns the state directory (batch files, caches).
RUN useradd --system --uid 10001 --home-dir /data --create-home tokenmill
USER tokenmill
ENV TOKENMILL_HOME=/data PYTHONUNBUFFERED=1
VOLUME /data
ENTRYPOINT ["tokenmill"]
