# The stream_mtl image: the package and its pinned dependencies (CPU torch; use a CUDA base for GPUs).
FROM python:3.11-slim
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements.lock
COPY stream_mtl ./stream_mtl
COPY topologies ./topologies
RUN pip install --no-cache-dir --no-deps .
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["stream-mtl"]
