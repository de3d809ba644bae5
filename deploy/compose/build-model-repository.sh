#!/bin/sh
# Assemble the Triton model repository the compose file mounts (TRITON_REPO, default
# /srv/dicom-node/triton), from this project's files:
#
#   $TRITON_REPO/models/spleen_seg/      the MONAI pipeline (Python backend), as in model_repository/
#   $TRITON_REPO/models/spleen_unet/     the network on the PyTorch (libtorch) backend:
#                                        deploy/triton-libtorch/spleen_unet + the bundle's TorchScript
#   $TRITON_REPO/bundles/spleen_ct_demo/ the bundle spleen_seg reads (its "bundle" parameter,
#                                        ../bundles/spleen_ct_demo from the models folder)
#
# UNET_BACKEND=python keeps model_repository/spleen_unet (Python backend, torch from the
# image's pip install) instead: for a container whose libtorch cannot load the TorchScript.
#
# Usage: deploy/compose/build-model-repository.sh   (from the project root)
set -eu

repo=${TRITON_REPO:-/srv/dicom-node/triton}
backend=${UNET_BACKEND:-libtorch}
bundle=bundles/spleen_ct_demo

test -f "$bundle/models/model.ts" || { echo "no $bundle/models/model.ts: run make demo-bundle" >&2; exit 2; }

# A fresh models/ folder: a model left from an earlier layout would be loaded too.
rm -rf "$repo/models" "$repo/bundles/spleen_ct_demo"
mkdir -p "$repo/models" "$repo/bundles"
cp -r model_repository/spleen_seg "$repo/models/"
if [ "$backend" = libtorch ]; then
    mkdir -p "$repo/models/spleen_unet/1"
    cp deploy/triton-libtorch/spleen_unet/config.pbtxt "$repo/models/spleen_unet/"
    cp "$bundle/models/model.ts" "$repo/models/spleen_unet/1/model.pt"
else
    cp -r model_repository/spleen_unet "$repo/models/"
fi
cp -r "$bundle" "$repo/bundles/"
find "$repo" -name __pycache__ -type d -prune -exec rm -rf {} +
echo "model repository ready in $repo (spleen_unet on the $backend backend)"
