"""Vectorizable float32 transcendental functions for the CPU targets.

TVM 0.27's LLVM backend compiles ``exp``, ``tanh``, ``sigmoid`` (legalized through ``exp``)
and ``erf`` to a scalar libm call per element (``expf@PLT``), which no schedule vectorizes:
a GRU step's gate function (3 x 1024 sigmoid/tanh) took 16 us, a third of the 90%-sparse
1024x3072 recurrent GEMV beside it, and GELU's erf took 23% of a sparse transformer.

:func:`fast_math_pass` is TVM's own Relax ``FastMathTransform`` (``exp`` -> ``topi.fast_exp``,
``tanh`` -> ``topi.fast_tanh``, ``erf`` -> ``topi.fast_erf``, ``softmax`` ->
``topi.nn.fast_softmax``: polynomial/rational approximations LLVM vectorizes) plus
``sigmoid(x) = 1 / (1 + fast_exp(-x))``, which TVM's pass leaves alone. It runs before
legalization in the CPU pipeline (and in tuning's task extraction, so tuning records match
the built functions). Errors against float64 references, asserted in
``tests/targets/test_cpu_schedules.py``: exp 1.1e-6 relative on [-20, 20] (4.1e-6 on
[-80, 80]; libm: 6e-8), tanh/sigmoid/erf/softmax below 1e-6 absolute.
"""
from __future__ import annotations


def dtype(e) -> str:
    """The dtype of a Relax expression ('' if it has none, e.g. a tuple)."""
    sinfo = getattr(e, "struct_info", None) or getattr(e, "ty", None)
    return str(getattr(sinfo, "dtype", ""))


def fast_math_pass():
    """TVM's ``FastMathTransform`` with ``relax.sigmoid`` added, over all Relax functions."""
    import tvm
    from tvm import relax, topi
    from tvm.relax import PyExprMutator, expr_functor
    from tvm.relax.transform.fast_math import FastMathCodeGenerator

    def sigmoid_te(x):
        one = tvm.tirx.const(1.0, x.dtype)
        return topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(x))))

    base = FastMathCodeGenerator._cls  # the undecorated class (a decorated one cannot be subclassed)

    @expr_functor.mutator
    class Rewriter(base):
        def visit_call_(self, call):
            name = getattr(call.op, "name", None)
            if name == "relax.sigmoid" and dtype(call.args[0]) == "float32":
                return self.builder_.call_te(sigmoid_te, self.visit_expr(call.args[0]), primfunc_name_hint="sigmoid")
            if name in ("relax.exp", "relax.tanh", "relax.erf", "relax.nn.softmax") and dtype(call.args[0]) != "float32":
                return PyExprMutator.visit_call_(self, call)  # float16 etc.: the exact op is kept
            return base.visit_call_(self, call)

    @tvm.transform.module_pass(opt_level=0, name="CompressorFastMath")
    def _pass(mod, _ctx):
        gen = Rewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                gen.builder_.update_func(gv, gen.visit_expr(func))
        return gen.builder_.get()

    return _pass


APPROXIMATED = {"relax.exp": "exp", "relax.tanh": "tanh", "relax.sigmoid": "sigmoid", "relax.erf": "erf",
                "relax.nn.softmax": "softmax"}


def approximated_ops(mod) -> dict[str, int]:
    """How many float32 calls of each op :func:`fast_math_pass` will replace in ``mod`` (a
    Relax module before legalization): recorded in the artifact's kernel record."""
    from tvm import relax
    from tvm.relax.analysis import post_order_visit

    counts: dict[str, int] = {}

    def visit(e):
        if isinstance(e, relax.Call):
            name = APPROXIMATED.get(getattr(e.op, "name", None))
            if name and e.args and dtype(e.args[0]) == "float32":
                counts[name] = counts.get(name, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            post_order_visit(func, visit)
    return counts
