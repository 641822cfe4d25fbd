"""ONNX Runtime graphs for the engine's matmul stages.

Each stage is one small ONNX graph run with one ``InferenceSession.run`` call, so a layer costs
three calls (Q/K/V, o_proj, FFN). Weights enter the sessions as *external initializers*
(``SessionOptions.add_external_initializers``) that point at the shard's memory-mapped arrays,
so building a session copies no weights through protobuf.

Linear kinds (see :mod:`potluck.sharding.extract`):

- ``q4`` / ``q8``: ``com.microsoft.MatMulNBits`` (bits 4 or 8, block 32, default zero point).
  ``accuracy_level`` 4 quantizes the activations to int8 per 32-element block, which is what
  llama.cpp does for Q4_0/Q8_0 (its ``vec_dot_type`` is Q8_0); measured on this machine it is
  4.7x (4-bit) and 90x (8-bit) faster than ``accuracy_level`` 0 for a 2048x5632 matrix.
- ``f32``: ``Gemm(transB=1)`` on the stored ``(N, K)`` matrix.
- ``f16``: activations rounded to float16 (as llama.cpp's F16 ``vec_dot_type`` does), then
  ``Gemm`` on the weights widened to float32 (2x the memory of the file, for fidelity).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

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
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL

    def constant(self, name: str, array: np.ndarray) -> str:
        """Declare ``array`` as an external initializer (no copy)."""
        array = np.ascontiguousarray(array)
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

    def linear(self, x: str, name: str, layout: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> str:
        """``y = x @ W.T (+ bias)`` for ``x`` float32 ``(T, k)``; returns the output name ``(T, n)``."""
        kind, n, k = layout["kind"], int(layout["n"]), int(layout["k"])
        out = f"{name}.out"
        if kind in ("q4", "q8"):
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
                    block_size=32,
                    accuracy_level=self.accuracy_level,
                )
            )
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

    def session(
        self, inputs: list[tuple[str, int]], outputs: list[str], options: ort.SessionOptions
    ) -> Stage:
        """Compile the graph. ``inputs``: (name, width) pairs of float32 ``(T, width)`` tensors."""
        graph = helper.make_graph(
            self.nodes,
            "stage",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["T", w]) for n, w in inputs],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            ir_version=IR_VERSION,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        )
        names = list(self.arrays)
        options.add_external_initializers(
            names, [ort.OrtValue.ortvalue_from_numpy(self.arrays[n]) for n in names]
        )
        sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return Stage(sess, [n for n, _ in inputs], outputs, self.arrays)


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
