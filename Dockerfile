# syntax=docker/dockerfile:1
# The one `awq` binary (every role: coordinator, worker, serve, and the client commands) on a CUDA
# runtime image with NCCL. The chart in charts/awq-cluster runs it.
#
#   docker build -t REGISTRY/awq-cluster:0.1.0 .      (the tag the chart uses: its appVersion)
#
# Nothing CUDA is needed to build: cudarc loads libcuda, libcublas, libnvrtc and libnccl at run
# time (dynamic loading), so the builder is a plain Rust image. At run time NVRTC compiles the
# kernels and needs CUDA's headers (cuda_fp16.h), which the runtime image lacks: they are copied
# from the devel image of the same CUDA release.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG CUDA_VERSION=13.0.2
ARG UBUNTU=ubuntu24.04

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# protoc comes from the protoc-bin-vendored crate (tools/protoc, through .cargo/config.toml).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features cuda -p awq-cli --bin awq \
    && install -D -m 0755 target/release/awq /out/awq \
    && /out/awq --version

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS cuda-headers

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
# curl: the chart's `helm test` pod requests /v1/models with it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# NCCL (libnccl2) comes with NVIDIA's runtime images; fail the build if a base image lacks it.
RUN ldconfig -p | grep -q 'libnccl\.so' || { echo "the base image has no libnccl.so: install libnccl2" >&2; exit 1; }
COPY --from=cuda-headers /usr/local/cuda/include /usr/local/cuda/include
COPY --from=builder /out/awq /usr/local/bin/awq
# A fixed non-root user; the chart's securityContext runs as the same ids.
RUN groupadd --system --gid 10001 awq \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/awq --create-home --shell /usr/sbin/nologin awq
USER 10001:10001
WORKDIR /home/awq
ENV AWQ_CUDA_INCLUDE=/usr/local/cuda/include \
    NCCL_NVLS_ENABLE=0
EXPOSE 50151 50152 8000
ENTRYPOINT ["awq"]
CMD ["--help"]
