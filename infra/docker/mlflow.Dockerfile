# syntax=docker/dockerfile:1.7
#
# MLflow tracking server image: `mlflow server` + PostgreSQL driver + boto3 for S3 artifacts.
# Same mlflow version as the training image (pinned in constraints.txt), so client and server agree.
#
# Build from the REPOSITORY ROOT (BuildKit reads infra/docker/mlflow.Dockerfile.dockerignore):
#   DOCKER_BUILDKIT=1 docker build -f infra/docker/mlflow.Dockerfile -t sdpo-mlflow:3.17.2 .
#
# Configuration comes from the environment (mlflow's own variables), never from the image:
#   MLFLOW_BACKEND_STORE_URI      postgresql://USER:PASSWORD@HOST:5432/DB   (from a secret)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://BUCKET/mlflow                        (artifacts proxied by the server)
#   MLFLOW_SERVER_ALLOWED_HOSTS   host names clients use (Host-header protection; /health is always allowed)
#   AWS credentials               task role / IRSA (preferred) or AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="sdpo-mlflow" \
      org.opencontainers.image.description="MLflow tracking server (PostgreSQL backend, S3 artifacts) for sdpo"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

COPY constraints.txt infra/docker/mlflow-server-requirements.txt /tmp/
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/mlflow-server-requirements.txt \
    && groupadd --gid 1000 mlflow \
    && useradd --uid 1000 --gid mlflow --create-home --shell /usr/sbin/nologin mlflow

WORKDIR /home/mlflow
USER 1000:1000
EXPOSE 5000

ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000", "--workers", "2"]
