# `make oci` (issue 16): filter.wasm as a Wasm OCI image that Istio's agent pulls (`oci://` URLs),
# the "compat" variant — one OCI manifest, one application/vnd.oci.image.layer.v1.tar+gzip layer
# holding plugin.wasm — written as an OCI image layout in target/oci/ and verified. Reproducible:
# the same filter.wasm gives the same digests. Push it with skopeo, oras or crane (printed, and in
# envoy/README.md). OCI_TAG defaults to the workspace version, the tag envoy/istio/oci/ names.
#   make oci OCI_TAG=0.1.0-rc1
# `make test-oci`: builds the image from the real filter.wasm and verifies it independently
# (digests, sizes, media types, the layer's tar with a second reader: Python's tarfile).

OCI_DIR := target/oci
OCI_TAG ?=
TEST_TARGETS += test-oci

.PHONY: oci test-oci
oci: wasm
	$(CARGO) run --quiet -p oci-image -- build --wasm $(WASM) --out $(OCI_DIR) $(if $(OCI_TAG),--tag $(OCI_TAG))

test-oci: wasm
	OCI_WASM=$(CURDIR)/$(WASM) $(CARGO) test -p oci-image
