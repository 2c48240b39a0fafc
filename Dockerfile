# screening-gateway image: `gateway serve` (listener + API) and `gateway worker` share it.
# Serving only: `pip install .` brings LiteRT, not TensorFlow; training/ and the [train] extra stay out.
FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 GATEWAY_DATA_DIR=/var/lib/gateway
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY dicom_listener dicom_listener
COPY inference inference
COPY reporting reporting
COPY api api
COPY orthanc orthanc
COPY gateway gateway
RUN pip install . && useradd --system --home /var/lib/gateway gateway && mkdir -p /var/lib/gateway \
    && chown gateway /var/lib/gateway
USER gateway
EXPOSE 11112 8000
ENTRYPOINT ["gateway"]
CMD ["serve"]
