#!/usr/bin/env bash
# Build (and optionally push) the bmseg images the pipeline's config names:
#   ghcr.io/bmseg/bmseg:<version>-cuda and ghcr.io/bmseg/bmseg:<version>-rocm
#
#   containers/build.sh [cuda|rocm|all] [--bake-models] [--push] [--sif]
#
# --bake-models  download the official weights into the image (needs network at build time)
# --push         push the Docker images to the registry (after `docker login ghcr.io`)
# --sif          build Apptainer images from the .def files instead of Docker images, for
#                sites without Docker: written into $NXF_APPTAINER_CACHEDIR under the name
#                Nextflow gives the pulled image (ghcr.io-bmseg-bmseg-<version>-<flavour>.img),
#                so a run with that apptainer.cacheDir (conf/viper.config) uses it, no pull
#
# TORCH_INDEX_URL in the environment replaces the ROCm image's PyTorch wheel index (the ROCm
# release the cluster's driver supports; containers/Dockerfile.rocm).
set -euo pipefail
cd "$(dirname "$0")/.."

registry="${BMSEG_REGISTRY:-ghcr.io/bmseg/bmseg}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)"
flavours=(cuda rocm)
bake=false
push=false
sif=false

for arg in "$@"; do
    case "${arg}" in
        cuda | rocm) flavours=("${arg}") ;;
        all) flavours=(cuda rocm) ;;
        --bake-models) bake=true ;;
        --push) push=true ;;
        --sif) sif=true ;;
        *)
            echo "build.sh: unknown argument '${arg}'; use cuda, rocm, all, --bake-models, --push or --sif" >&2
            exit 2
            ;;
    esac
done

for flavour in "${flavours[@]}"; do
    tag="${registry}:${version}-${flavour}"
    build_args=(--build-arg "BAKE_MODELS=${bake}")
    if [[ "${flavour}" == rocm && -n "${TORCH_INDEX_URL:-}" ]]; then
        build_args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL}")
    fi
    if [[ "${sif}" == true ]]; then
        cache="${NXF_APPTAINER_CACHEDIR:?build.sh --sif: set NXF_APPTAINER_CACHEDIR to the folder apptainer.cacheDir names}"
        image="${cache}/${tag//[:\/]/-}.img"
        mkdir -p "${cache}"
        apptainer build --force "${build_args[@]}" "${image}" "containers/bmseg-${flavour}.def"
        echo "built ${image}"
        continue
    fi
    docker build --file "containers/Dockerfile.${flavour}" "${build_args[@]}" --tag "${tag}" .
    if [[ "${push}" == true ]]; then
        docker push "${tag}"
    fi
    echo "built ${tag}"
done
