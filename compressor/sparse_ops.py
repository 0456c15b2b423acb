"""The sparse operators ``lower.sparse`` writes and the backends implement: one definition of their names.

All live in the ONNX domain ``compressor`` with inputs ``(X, data, indices, indptr, bias)``: BSR weights of
shape ``[N, K]``. ``SparseMatMul[Relu]``: ``Y = X @ W^T + bias`` over X's last dim. ``SparseConv1x1[Relu]``:
``Y = Conv(X, W[:, :, None, None], bias)`` over X's dim 1 (NCHW). ``SparseConv[Relu]`` (attributes
``kernel_shape``, ``strides``, ``pads`` as ONNX Conv's; group 1, dilation 1): ``W`` is ``[O, I*KH*KW]`` and
``Y = Conv(X, W.reshape(O, I, KH, KW), bias, strides, pads)``.
"""
from __future__ import annotations

DOMAIN = "compressor"
MATMUL = "SparseMatMul"
MATMUL_RELU = "SparseMatMulRelu"
CONV1X1 = "SparseConv1x1"
CONV1X1_RELU = "SparseConv1x1Relu"
MATMUL_OPS: tuple[str, ...] = (MATMUL, MATMUL_RELU)
KXK = "SparseConv"
KXK_RELU = "SparseConvRelu"
CONV_OPS: tuple[str, ...] = (CONV1X1, CONV1X1_RELU)
KXK_OPS: tuple[str, ...] = (KXK, KXK_RELU)
ALL_OPS: tuple[str, ...] = MATMUL_OPS + CONV_OPS + KXK_OPS
# int8: SparseQMatMul[Relu](X, data, indices, indptr, scale, corr, bias, x_scale, x_zero_point): X float [.., K]
# quantized per tensor to uint8 (QuantizeLinear), W int8 [N, K] in R x 4 blocks (data [nnzb, R, 4]),
# Y = (Xq @ W^T - corr) * scale + bias with corr = x_zero_point * rowsum(W), scale = x_scale * w_scale
# (targets.sparse_int8). Not in ALL_OPS: the qemu dense twin does not rebuild them (x86 only so far).
QMATMUL = "SparseQMatMul"
QMATMUL_RELU = "SparseQMatMulRelu"
# dynamic int8 (quantize.int8's choice for transformer MatMuls): SparseDQMatMul(X, data, indices, indptr,
# w_scale, rowsum, bias): X quantized per call as DynamicQuantizeLinear does (uint8, scale and zero point from
# X's range), Y = (Xq @ W^T - x_zero_point * rowsum) * (x_scale * w_scale) + bias
DQMATMUL = "SparseDQMatMul"
QMATMUL_OPS: tuple[str, ...] = (QMATMUL, QMATMUL_RELU, DQMATMUL)


def is_sparse_op(domain: str, op_type: str) -> bool:
    return domain == DOMAIN and op_type in ALL_OPS


def has_relu(op_type: str) -> bool:
    return op_type in (MATMUL_RELU, CONV1X1_RELU, KXK_RELU, QMATMUL_RELU)
