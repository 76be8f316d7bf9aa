# epcwatch services (detector, trainer, producer) on CPU.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY requirements.txt pyproject.toml ./
RUN pip install -r requirements.txt
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
