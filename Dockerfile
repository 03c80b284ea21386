# tokenmill image for the deployed stack (docker-compose.yml).
# Build arg VLLM selects the engine build: "vllm" (CUDA, default) or "cpu".
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
RUN pip install --no-cache-dir ".[${VLLM},postgres]" && pip install --no-cache-dir "click>=8.1,<8.4"
ENV TOKENMILL_HOME=/data PYTHONUNBUFFERED=1
VOLUME /data
ENTRYPOINT ["tokenmill"]
