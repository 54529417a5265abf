"""ExecuTorch export (.pte with the XNNPACK delegate) and a runner over the ExecuTorch runtime.

torch.export -> to_edge_transform_and_lower(XnnpackPartitioner) -> to_executorch. Models quantized with
torchao's Int8DynActInt4Weight/Int8WeightOnly export as quantize/dequantize patterns that the XNNPACK
partitioner lowers to its integer kernels; palettized models export their (de-palettized) float weights.

What XNNPACK does not take runs in ExecuTorch's own (mostly portable, one element at a time) kernels, and
every such op also cuts the graph into another delegate call. The denoiser used to be cut into ~100
delegate calls with ~860 ops outside them (the constant-index gather of blockwise neighbourhood attention
alone took 40% of a step), so the export rewrites the graph into ops XNNPACK does take, all exact:

  * SDPA is decomposed as matmul / softmax / matmul (`sdpa_as_matmuls`) instead of torch's decomposition,
    whose "safe softmax" (any / eq / logical_not / where) and scalar multiplies run outside XNNPACK.
  * `XnnpackFriendlyOps`, an edge-dialect pass: unsqueeze / squeeze -> reshape, select -> slice + reshape,
    expand -> reshape + concatenation of copies, a gather with a constant index (`x[:, idx]`) -> slices +
    concatenation, a mean over trailing dimensions -> a 4-D mean over the innermost two (the only form
    XNNPACK takes), and a concatenation that lists one tensor twice gets a copy for the second mention.
  * LayerNorms are written as elementwise ops (`graphs.decompose_layer_norms`).

With all of them the shapes-checkpoint denoiser lowers to a single delegate call. Parity is checked against
the unmodified eager module on export as before.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .graphs import GraphSpec, decompose_layer_norms

SUFFIX = ".pte"


def lower_to_edge(spec: GraphSpec, decompose_norms: bool = True, xnnpack_rewrites: bool = True):
    """`spec.module` at its example shapes -> an XNNPACK-lowered EdgeProgramManager (see the module doc)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    module = spec.module
    if decompose_norms:
        module = decompose_layer_norms(copy.deepcopy(module))
    with torch.no_grad():
        program = torch.export.export(module, spec.example_inputs, strict=False)
        passes = []
        if xnnpack_rewrites:
            program = decompose_sdpa(program)
            passes = [XnnpackFriendlyOps().as_pass()]
        return to_edge_transform_and_lower(program, transform_passes=passes, partitioner=[XnnpackPartitioner()])


def export_executorch(spec: GraphSpec, path: Union[str, os.PathLike], decompose_norms: bool = True, xnnpack_rewrites: bool = True) -> Path:
    """Lower `spec.module` at its example shapes to an XNNPACK-delegated ExecuTorch program at `path`.

    decompose_norms: export a copy whose LayerNorms are written as XNNPACK-supported elementwise ops
    (`graphs.decompose_layer_norms`). xnnpack_rewrites: rewrite SDPA and shape ops into XNNPACK-lowerable
    forms (module doc). Both keep the maths; parity is checked against the unmodified eager module.
    """
    path = Path(path)
    edge = lower_to_edge(spec, decompose_norms, xnnpack_rewrites)
    et_program = edge.to_executorch()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(et_program.buffer)
    return path


def delegation_summary(edge) -> dict:
    """How much of a lowered program XNNPACK runs: delegate calls, and ops left outside them by kind."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge.exported_program().graph_module)
    outside = {}
    for op, stats in info.delegation_by_operator.items():
        if op != "getitem" and stats.non_delegated > 0:
            outside[op] = stats.non_delegated
    return {"delegate_calls": info.num_delegated_subgraphs, "delegated_ops": info.num_delegated_nodes,
            "ops_outside": dict(sorted(outside.items(), key=lambda kv: -kv[1]))}


def set_threads(threads: Optional[int]) -> None:
    """Size ExecuTorch's (process-wide) thread pool; XNNPACK uses it. Its default is every core."""
    if threads:
        from executorch.extension.pybindings import portable_lib

        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(int(threads))


class ExecuTorchRunner:
    """Load a .pte once; call it with tensors, get the first output tensor back.

    threads: size of ExecuTorch's thread pool (process-wide; None leaves it, by default one per core).
    """

    runtime = "executorch"

    def __init__(self, path: Union[str, os.PathLike], threads: Optional[int] = None):
        from executorch.runtime import Runtime

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ExecuTorch program {path} not found; export one with `pocketdit export --format executorch`")
        set_threads(threads)
        self.path = path
        # The method reads the program's memory: keep the program alive as long as the method.
        self.program = Runtime.get().load_program(path)
        self.method = self.program.load_method("forward")

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.method.execute([x.contiguous() for x in inputs])[0]


def profile_executorch(path: Union[str, os.PathLike], inputs, runs: int = 10, threads: Optional[int] = 1) -> list[dict]:
    """Median time per call of each kind of op in one .pte, from an ETDump of `runs` calls.

    Rows {"op", "delegated", "calls", "ms"} (ms summed over one call's instances of that op, median over
    calls), slowest first, plus a row "total" (whole method). XNNPACK ops are named as XNNPACK names them
    ("Fully Connected (NC, F32) GEMM"); ops outside the delegate as their ExecuTorch kernel ("aten::index").
    """
    import statistics
    import tempfile

    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    set_threads(threads)
    program = Runtime.get().load_program(Path(path), enable_etdump=True, debug_buffer_size=0)
    method = program.load_method("forward")
    inputs = [x.contiguous() for x in inputs]
    for _ in range(runs):
        method.execute(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        etdump = os.path.join(tmp, "run.etdp")
        program.write_etdump_result_to_file(etdump, os.path.join(tmp, "debug.bin"))
        inspector = Inspector(etdump_path=etdump)
    per_kind: dict = {}
    total = None
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for ev in block.events:
            if ev.perf_data is None:
                continue
            raw = list(ev.perf_data.raw)
            if ev.name == "Method::execute":
                total = raw
                continue
            if ev.name == "OPERATOR_CALL":
                continue  # the wrapper around each native_call_* below
            name = ev.name.rstrip("0123456789# ").strip()
            if ev.name == "DELEGATE_CALL":
                name = "DELEGATE_CALL (a whole XNNPACK call, its ops included)"
            elif not ev.is_delegated_op:
                name = name.replace("native_call_", "aten::")
            key = (name, bool(ev.is_delegated_op))
            acc = per_kind.setdefault(key, [0, [0.0] * len(raw)])
            acc[0] += 1
            acc[1] = [a + b for a, b in zip(acc[1], raw)]
    rows = [{"op": k[0], "delegated": k[1], "calls": c, "ms": statistics.median(t)} for k, (c, t) in per_kind.items()]
    rows.sort(key=lambda r: -r["ms"])
    if total:
        rows.insert(0, {"op": "total", "delegated": None, "calls": 1, "ms": statistics.median(total)})
    return rows


# ----------------------------------------------------------------------------------------------------
# Rewrites into XNNPACK-lowerable ops
# ----------------------------------------------------------------------------------------------------
def sdpa_as_matmuls(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention as matmul -> (+ mask) -> softmax -> matmul: ops XNNPACK runs.

    Same values as SDPA, except a query row whose keys are ALL masked: SDPA returns 0 there, this returns
    the mean of the values (boolean mask) or NaN (float mask of -inf). PocketDiT never has such rows (the
    null text token is always attended to). Grouped-query k/v (enable_gqa) are read in place by folding
    each group's query heads into the token axis.
    """
    if dropout_p != 0.0:
        raise ValueError("sdpa_as_matmuls is for inference graphs (dropout_p must be 0)")
    q_len, k_len = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    heads, kv_heads = query.shape[-3], key.shape[-3]
    grouped = enable_gqa and heads != kv_heads
    if grouped:  # query head i reads kv head i // (heads / kv_heads): fold each group into the token axis
        query = query.reshape(*query.shape[:-3], kv_heads, (heads // kv_heads) * q_len, query.shape[-1])
    scores = torch.matmul(query * scale, key.transpose(-2, -1))
    mask = attn_mask
    if is_causal:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
        mask = causal if mask is None else (mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, float("-inf")))
    if mask is not None:
        if mask.dtype == torch.bool:  # additive: 0 where attended, the most negative float elsewhere
            mask = (1.0 - mask.to(scores.dtype)) * torch.finfo(scores.dtype).min
        if grouped:  # mask (..., heads or 1, q, k) against scores (..., kv_heads, group * q, k)
            group = heads // kv_heads
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
            mask = mask.unflatten(-3, (kv_heads, group)) if mask.shape[-3] == heads else mask.unsqueeze(-3)
            scores = (scores.unflatten(-2, (group, q_len)) + mask).flatten(-3, -2)
        else:
            scores = scores + mask
    out = torch.matmul(torch.softmax(scores, dim=-1), value)
    if grouped:
        out = out.reshape(*out.shape[:-3], heads, q_len, out.shape[-1])
    return out


def decompose_sdpa(program):
    """The exported program with every scaled_dot_product_attention written by `sdpa_as_matmuls`."""
    return program.run_decompositions({torch.ops.aten.scaled_dot_product_attention.default: sdpa_as_matmuls})


def _meta(value):
    if isinstance(value, torch.fx.Node):
        return value.meta["val"]
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(v) for v in value)
    return value


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


class XnnpackFriendlyOps:
    """Edge-dialect pass: ops the XNNPACK partitioner rejects, rewritten exactly into ops it takes.

    unsqueeze/squeeze -> view; select -> slice + view; expand -> view + cat of copies; index with one
    constant index tensor -> slices + cat + view; mean over trailing dims (keepdim) -> 4-D mean over
    dims (2, 3); cat listing one tensor twice -> a view copy for the repeat. A run of the pass over an
    ExportedProgram (it reads lifted constants to see constant indices).
    """

    def as_pass(self):
        """This rewrite as an ExecuTorch ExportedProgram pass (for `to_edge_transform_and_lower`)."""
        from executorch.exir.pass_base import ExportedProgramPassBase

        rewrite = self

        class _Pass(ExportedProgramPassBase):
            def call(self, exported_program):
                return rewrite(exported_program)

        return _Pass()

    def __call__(self, exported_program):
        from executorch.exir.pass_base import ExportedProgramPassResult
        from torch.export.graph_signature import InputKind

        constants = {}
        for spec in exported_program.graph_signature.input_specs:
            if spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.BUFFER) and spec.target is not None:
                value = exported_program.constants.get(spec.target, exported_program.state_dict.get(spec.target))
                if isinstance(value, torch.Tensor):
                    constants[spec.arg.name] = value
        modified = self.rewrite(exported_program.graph_module, constants)
        return ExportedProgramPassResult(exported_program, modified)

    # ------------------------------------------------------------------------------------------------
    def rewrite(self, gm: torch.fx.GraphModule, constants: Optional[dict] = None) -> bool:
        from executorch.exir.dialects._ops import ops as exir_ops

        self.ops = exir_ops.edge.aten
        self.graph = gm.graph
        self.constants = dict(constants or {})
        self._const_cache: dict = {}
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            with gm.graph.inserting_before(node):
                new = self._replacement(node)
            if new is None:
                continue
            if tuple(new.meta["val"].shape) != tuple(node.meta["val"].shape):  # pragma: no cover - a bug in a rule
                raise AssertionError(f"XnnpackFriendlyOps changed the shape of {node.format_node()}")
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return changed

    def _new(self, op, args, like):
        """A node `op(*args)` before `like`, with `like`'s metadata and its own value (computed on fakes)."""
        node = self.graph.call_function(op, tuple(args))
        node.meta = dict(like.meta)
        node.meta["val"] = op(*[_meta(a) for a in args])
        return node

    def _view(self, x, shape, like):
        return self._new(self.ops.view_copy.default, [x, [int(s) for s in shape]], like)

    def _replacement(self, node):
        ops, t = self.ops, node.target
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor):
            return None
        if t in (ops.unsqueeze_copy.default, ops.squeeze_copy.dims, ops.squeeze_copy.dim, ops.squeeze_copy.default):
            return self._view(node.args[0], out.shape, node)
        if t == ops.select_copy.int:
            x, dim, index = node.args
            index = index % _meta(x).shape[dim]
            return self._view(self._new(ops.slice_copy.Tensor, [x, dim, index, index + 1], node), out.shape, node)
        if t == ops.expand_copy.default:
            return self._expand(node, out)
        if t == ops.index.Tensor:
            return self._constant_gather(node, out)
        if t == ops.mean.dim:
            return self._mean(node, out)
        if t == ops.cat.default and len(set(node.args[0])) < len(node.args[0]):
            seen, inputs = set(), []
            for x in node.args[0]:
                inputs.append(self._view(x, _meta(x).shape, node) if x in seen else x)
                seen.add(x)
            return self._new(ops.cat.default, [inputs, *node.args[1:]], node)
        return None

    def _expand(self, node, out):
        x = node.args[0]
        target = list(out.shape)
        shape = [1] * (len(target) - _meta(x).dim()) + list(_meta(x).shape)
        current = None
        for d, (have, want) in enumerate(zip(shape, target)):
            if have == want:
                continue
            # (outer, 1, inner) copies concatenated on the middle axis: rank 3, distinct inputs
            outer, inner = _numel(shape[:d]), _numel(shape[d + 1:])
            src = x if current is None else current
            copies = [self._view(src, (outer, 1, inner), node) for _ in range(want)]
            shape[d] = want
            current = self._view(self._new(self.ops.cat.default, [copies, 1], node), shape, node)
        return current if current is not None else self._view(x, target, node)

    def _mean(self, node, out):
        if len(node.args) < 3 or not node.args[2] or node.kwargs.get("dtype") is not None:
            return None
        x, dims = node.args[0], node.args[1]
        shape = list(_meta(x).shape)
        rank = len(shape)
        dims = sorted(int(d) % rank for d in dims)
        if (rank == 4 and dims == [2, 3]) or dims != list(range(rank - len(dims), rank)):
            return None
        keep = rank - len(dims)
        flat = self._view(x, (1, _numel(shape[:keep]), 1, _numel(shape[keep:])), node)
        return self._view(self._new(self.ops.mean.dim, [flat, [2, 3], True], node), out.shape, node)

    def _constant_gather(self, node, out):
        x, indices = node.args
        positions = [i for i, ix in enumerate(indices) if ix is not None]
        if len(positions) != 1:
            return None
        dim = positions[0]
        index = self._constant(indices[dim])
        if index is None or index.dtype not in (torch.int64, torch.int32) or index.numel() == 0:
            return None
        size = _meta(x).shape[dim]
        flat = [int(v) % size for v in index.reshape(-1).tolist()]
        runs, start = [], 0  # maximal runs of consecutive indices, one slice each
        for j in range(1, len(flat) + 1):
            if j == len(flat) or flat[j] != flat[j - 1] + 1:
                runs.append((flat[start], flat[j - 1] + 1))
                start = j
        pieces = [self._new(self.ops.slice_copy.Tensor, [x, dim, a, b], node) for a, b in runs]
        gathered = pieces[0] if len(pieces) == 1 else self._new(self.ops.cat.default, [pieces, dim], node)
        return self._view(gathered, out.shape, node)

    def _constant(self, node):
        """The value of a node that depends on no graph input (arange, clamp, lifted constants), else None."""
        if not isinstance(node, torch.fx.Node):
            return node
        if node in self._const_cache:
            return self._const_cache[node]
        value = None
        if node.op == "placeholder":
            value = self.constants.get(node.name)
        elif node.op == "call_function":
            missing = []

            def resolve(a):
                if isinstance(a, torch.fx.Node):
                    v = self._constant(a)
                    if v is None:
                        missing.append(a)
                    return v
                if isinstance(a, (list, tuple)):
                    return type(a)(resolve(v) for v in a)
                return a

            args = resolve(list(node.args))
            kwargs = {k: resolve(v) for k, v in node.kwargs.items()}
            if not missing:
                try:
                    value = node.target(*args, **kwargs)
                except Exception:  # an op that cannot run eagerly here: treat as not constant
                    value = None
        self._const_cache[node] = value
        return value
