"""ONNX Runtime graph building: linear layers, activation rounding, compiled programs.

:class:`GraphBuilder` accumulates the nodes of one graph (the transformer blocks themselves are in
:mod:`potluck.sharding.compute.blocks`); :meth:`GraphBuilder.program` compiles it into a :class:`Program`
that runs through ORT's IO binding on caller-owned numpy buffers (no copies in or out; the KV cache
rows are written in place). Weights enter the sessions as *external initializers*
(``SessionOptions.add_external_initializers``) that point at the shard's memory-mapped arrays,
so building a session copies no weights through protobuf.

Linear kinds (see :mod:`potluck.sharding.format.extract`):

- ``q4`` / ``q8``: ``com.microsoft.MatMulNBits`` (bits 4 or 8, block 16 or 32, default zero point),
  plus one ``Gemm`` of the activations' block sums for GGUF types with a per-block minimum.
  ``accuracy_level`` 4 (int8 activations per block) was chosen by measurement: for a 2048x5632
  matrix it is 4.7x (4-bit) and 90x (8-bit) faster than level 0 on this machine. llama.cpp also
  quantizes activations to int8 (Q8_0 blocks of 32 with a float16 scale, or Q8_K blocks of 256), so
  neither engine is exact; emulating Q8_0's float16 scales in the graph (10 nodes per input, removed)
  bought about 1 point of top-1 agreement with llama.cpp and cost 15 % of the N = 2 decode step.
  Measured with ``potluck shard perplexity`` (384 tokens of ARCHITECTURE.md): level 4 gives a
  perplexity within 1 % of llama.cpp's and 93-95 % top-1 agreement on SmolLM2 Q4_1 and Gemma 3
  Q4_K_M; level 0 (float activations) gives 95-97 %, and a lower perplexity than llama.cpp.
  Cost model worth knowing: at level 4 MLAS repacks B with a float32 scale and a float32 block sum
  per 32-block (24 bytes per block where llama.cpp reads 18; measured: a 32000x2048 Q4_0 session
  grows the process by 73 MB at level 4, 49 MB at level 0, for 41 MB of nibbles + scales), so a
  memory-bound decode reads up to a third more bytes than llama.cpp's.
- ``f32``: ``Gemm(transB=1)`` on the stored ``(N, K)`` matrix.
- ``f16``: activations rounded to float16 (as llama.cpp's F16 ``vec_dot_type`` does), then
  ``Gemm`` on the weights widened to float32 (2x the memory of the file, for fidelity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 17
DEFAULT_ACCURACY_LEVEL = 4


def session_options(threads: int, spinning: bool) -> ort.SessionOptions:
    """Options for small latency-bound sessions.

    Args:
        threads: intra-op threads (1 per co-located rank on a 2-core machine).
        spinning: let idle pool threads spin; only worth it when the process owns its cores.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


@dataclass
class GraphBuilder:
    """Accumulates nodes and external initializers of one stage graph."""

    nodes: list[Any] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    _quantized: dict[str, str] = field(default_factory=dict)

    def add_input(self, name: str, dtype: type | np.dtype, dims: Sequence[int | str]) -> str:
        """Declare a graph input of numpy ``dtype`` and shape ``dims`` (strings are symbolic)."""
        self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims))
        return name

    def node(self, op: str, inputs: Sequence[str], output: str, domain: str = "", **attrs: Any) -> str:
        """Append one node with a single output; returns the output name."""
        self.nodes.append(helper.make_node(op, list(inputs), [output], domain=domain, **attrs))
        return output

    def constant(self, name: str, array: np.ndarray) -> str:
        """Declare ``array`` as an initializer: external (no copy) unless it is tiny (shapes, scalars),
        which must be inline for ONNX shape inference."""
        array = np.ascontiguousarray(array)
        if array.nbytes <= 64:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        proto = TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        proto.dims.extend(array.shape)
        proto.data_location = TensorProto.EXTERNAL
        entry = proto.external_data.add()
        entry.key, entry.value = "location", "in-memory"
        self.initializers.append(proto)
        self.arrays[name] = array
        return name

    def block_sums(self, x: str, k: int, block: int) -> str:
        """``sum_j x[t, b*block + j]`` for ``x`` float32 ``(T, k)``: float32 ``(T, k/block)``, once per input."""
        key = f"{x}.bsum{block}"
        if key in self._quantized:
            return self._quantized[key]
        blocks = self.node(
            "Reshape", [x, self.constant(f"{key}.shape", np.array([0, k // block, block], np.int64))], f"{key}.blk"
        )
        out = self.node("ReduceSum", [blocks, self.constant(f"{key}.axes", np.array([2], np.int64))], key, keepdims=0)
        self._quantized[key] = out
        return out

    def linear(self, x: str, name: str, layout: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> str:
        """``y = x @ W.T (+ bias)`` for ``x`` float32 ``(T, k)``; returns the output name ``(T, n)``.

        Quantized kinds: ``MatMulNBits`` over 16- or 32-element blocks (``layout["block"]``, 32 when
        absent), plus, when ``tensors`` hold ``<name>.block_bias`` float32 ``(n, k/block)`` (GGUF
        types with a per-block minimum, :mod:`potluck.sharding.format.nbits`), one ``Gemm`` adding
        ``block_sums(x) @ block_bias.T``.
        """
        kind, n, k = layout["kind"], int(layout["n"]), int(layout["k"])
        out = f"{name}.out"
        if kind in ("q4", "q8"):
            block = int(layout.get("block", 32))
            b = self.constant(f"{name}.B", tensors[f"{name}.B"])
            s = self.constant(f"{name}.scales", tensors[f"{name}.scales"])
            self.nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [x, b, s],
                    [out],
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=4 if kind == "q4" else 8,
                    block_size=block,
                    accuracy_level=self.accuracy_level,
                )
            )
            if f"{name}.block_bias" in tensors:
                bias = self.constant(f"{name}.block_bias", tensors[f"{name}.block_bias"])
                out = self.node("Gemm", [self.block_sums(x, k, block), bias, out], f"{name}.with_mins", transB=1)
        elif kind in ("f32", "f16"):
            w = tensors[f"{name}.W"]
            if kind == "f16":
                rounded = f"{name}.x16"
                self.nodes.append(helper.make_node("Cast", [x], [rounded + "h"], to=TensorProto.FLOAT16))
                self.nodes.append(helper.make_node("Cast", [rounded + "h"], [rounded], to=TensorProto.FLOAT))
                x, w = rounded, w.astype(np.float32)
            self.nodes.append(helper.make_node("Gemm", [x, self.constant(f"{name}.W", w)], [out], transB=1))
        else:
            raise ValueError(f"unknown linear kind {kind!r}")
        if f"{name}.bias" in tensors:
            biased = f"{name}.biased"
            self.nodes.append(
                helper.make_node("Add", [out, self.constant(f"{name}.b", tensors[f"{name}.bias"])], [biased])
            )
            out = biased
        return out

    def session(self, inputs: list[tuple[str, int]], outputs: list[str], options: ort.SessionOptions) -> Stage:
        """Compile the graph. ``inputs``: (name, width) pairs of float32 ``(T, width)`` tensors."""
        for n, w in inputs:
            self.add_input(n, np.float32, ["T", w])
        sess = self._compile([(o, np.float32) for o in outputs], options)
        return Stage(sess, [n for n, _ in inputs], outputs, self.arrays)

    def program(self, outputs: Sequence[tuple[str, type | np.dtype]], options: ort.SessionOptions) -> Program:
        """Compile the graph (inputs declared with :meth:`add_input`) into an IO-bound :class:`Program`."""
        return Program(self._compile(outputs, options), self.arrays)

    def program_on_disk(
        self,
        outputs: Sequence[tuple[str, type | np.dtype]],
        options: ort.SessionOptions,
        path: Path,
        load_options: ort.SessionOptions,
    ) -> Program:
        """Compile the graph once, write it with its *prepacked* weights to ``<path>.onnx`` and
        ``<path>.data`` (ORT's ``session.save_external_prepacked_constant_initializers``), and load it
        back: ORT then memory-maps the weights from ``<path>.data`` instead of holding them on its heap
        (:mod:`potluck.sharding.compute.residency` releases and prefetches those pages).

        Args:
            outputs: as :meth:`program`.
            options: options for the compile that writes the files (consumed).
            path: file stem; its directory must exist.
            load_options: options for the session that runs (fresh, without external initializers).
        """
        model = path.parent / (path.name + ".onnx")
        options.optimized_model_filepath = str(model)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", path.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        writer = self._compile(outputs, options)
        del writer  # its heap copy of the prepacked weights goes with it
        session = ort.InferenceSession(str(model), load_options, providers=["CPUExecutionProvider"])
        return Program(session, {})

    def _compile(
        self, outputs: Sequence[tuple[str, type | np.dtype]], options: ort.SessionOptions
    ) -> ort.InferenceSession:
        graph = helper.make_graph(
            self.nodes,
            "stage",
            self.inputs,
            [helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(np.dtype(t)), None) for o, t in outputs],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            ir_version=IR_VERSION,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        )
        names = list(self.arrays)
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(self.arrays[n]) for n in names])
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@dataclass
class Stage:
    """A compiled stage; keeps its weight arrays alive as long as the session."""

    session: ort.InferenceSession
    inputs: list[str]
    outputs: list[str]
    keep_alive: dict[str, np.ndarray]

    def run(self, *xs: np.ndarray) -> list[np.ndarray]:
        """Run on float32 ``(T, width)`` inputs; returns the outputs in declaration order."""
        return self.session.run(self.outputs, dict(zip(self.inputs, xs, strict=False)))


class Program:
    """A compiled graph run through ORT's IO binding on caller-owned, C-contiguous numpy buffers.

    Inputs are read and outputs written in place (no copies through ``InferenceSession.run``); the
    caller keeps every bound array alive until :meth:`run` returns. The weight arrays of the graph
    are kept alive as long as the program.
    """

    def __init__(self, session: ort.InferenceSession, keep_alive: dict[str, np.ndarray]) -> None:
        self.session = session
        self.keep_alive = keep_alive
        self._io = session.io_binding()
        self._bound: dict[str, np.ndarray] = {}  # name -> the array bound last (kept alive with its address)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Bind ``inputs`` and preallocated ``outputs`` (exact shapes and dtypes) by address and run.

        An argument that is the very array bound by the previous run keeps its binding (the engine
        reuses its decode buffers and fused attention's KV cache every step), so only new arrays are
        bound; an array's shape must not be changed in place between runs.

        Raises:
            ValueError: an array is not C-contiguous (or an output is read-only).
            onnxruntime exceptions (``Fail``, ``InvalidArgument``): shapes or dtypes do not fit the graph.
        """
        io, bound = self._io, self._bound
        for name, a in inputs.items():
            if not a.flags.c_contiguous:
                raise ValueError(f"input {name} is not C-contiguous")
            if bound.get(name) is not a:
                io.bind_input(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
                bound[name] = a
        for name, a in outputs.items():
            if not (a.flags.c_contiguous and a.flags.writeable):
                raise ValueError(f"output {name} is not a writeable C-contiguous array")
            if bound.get(name) is not a:
                io.bind_output(name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
                bound[name] = a
        self.session.run_with_iobinding(io)
