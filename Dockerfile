# FaceChain Bot for a CUDA host: docker build -t facechain-bot . &&
#   docker run --gpus all -e FACECHAIN_TELEGRAM_TOKEN=... -v fc-data:/data -v fc-models:/models facechain-bot
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 facechain
WORKDIR /app
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The CUDA build of the same torch release the project pins.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md ./
COPY bot bot
COPY handlers handlers
COPY facechain_core facechain_core
COPY styles styles
# The ray extra: the same image serves a Ray head and its GPU nodes (README: Ray cluster).
RUN pip install '.[ray]'

COPY config.example.toml /app/config.toml
RUN sed -i 's#^data_dir = .*#data_dir = "/data"#; s#^models_dir = .*#models_dir = "/models"#; s#^gpus = .*#gpus = [0]#; s|^# styles_dir = .*|styles_dir = "/app/styles"|' /app/config.toml \
 && mkdir -p /data /models && chown facechain /data /models

USER facechain
VOLUME ["/data", "/models"]

# Healthy while the service's heartbeat file is fresh (written by the scheduler loop).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["facechain-bot", "--config", "/app/config.toml", "health"]

ENTRYPOINT ["facechain-bot", "--config", "/app/config.toml"]
CMD ["run"]
