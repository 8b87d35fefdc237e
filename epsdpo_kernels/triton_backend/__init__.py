"""The Triton backend: the per-token kernels (with the merge of vocabulary partials they use),
the per-sequence sums and the pair head, each launched on its tensors' device. Imported only when
used (dispatch.py): CPU users need no working Triton install."""
