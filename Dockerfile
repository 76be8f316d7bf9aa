# epcwatch services (detector, trainer, producer) on CPU.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY requirements.txt pyproject.toml ./
# CPU-only torch: the CUDA wheels and their nvidia-* libraries are left out of the image.
RUN grep -v -E '^(nvidia-|triton==|torch==)' requirements.txt > /tmp/requirements-cpu.txt \
    && pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.9.1" \
    && pip install -r /tmp/requirements-cpu.txt
COPY config ./config
COPY consumer ./consumer
COPY detector ./detector
COPY drift ./drift
COPY producer ./producer
COPY epcwatch ./epcwatch
RUN pip install --no-deps . && useradd --create-home epcwatch && mkdir -p /app/models /app/data \
    && chown -R epcwatch /app
USER epcwatch
ENTRYPOINT ["epcwatch"]
CMD ["--help"]
