"""Export profiles: rewrites of a saved ONNX model for a consumer's parser.

The ``"tensorrt"`` profile (``to_onnx(..., target="tensorrt")``) makes the file acceptable to
TensorRT's ONNX parser (onnx-tensorrt) from 10.0 on, in the main graph and in every ``If`` branch:

* attributes equal to their schema default are dropped (onnx-tensorrt 10.0/10.1 refuse any
  ``reduction`` attribute on ``ScatterND``, even ``"none"``: onnx-tensorrt #1013, onnxruntime #23618);
* the opset is capped at :data:`TENSORRT_MAX_OPSET` (from opset 23 the exporter emits ``Attention``,
  which TensorRT does not accept inside a conditional);
* small constants that the main graph and a branch share are duplicated into the branch under a new
  name (the parser caches constant layers by name across scopes).
"""

from __future__ import annotations

from collections.abc import Iterator

TARGETS = (None, "onnxruntime", "tensorrt")
#: The highest opset the TensorRT profile exports (the exporter's default in torch 2.13 is 20).
TENSORRT_MAX_OPSET = 20
#: Ops the profile refuses anywhere in the file.
TENSORRT_REFUSED_OPS = {"Attention"}
#: Shared constants above this many bytes are left shared (weights are not duplicated).
MAX_DUPLICATED_BYTES = 1 << 16


def walk_graphs(graph) -> Iterator:
    """``graph`` and every subgraph in it (``If`` branches, loop bodies), depth first."""
    import onnx

    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from walk_graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from walk_graphs(subgraph)


def default_valued_attributes(model) -> list[tuple[object, object]]:
    """``(node, attribute)`` pairs, in every graph, whose value equals the op schema's default."""
    import onnx

    opsets = {entry.domain: entry.version for entry in model.opset_import}
    found = []
    for graph in walk_graphs(model.graph):
        for node in graph.node:
            try:
                schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain, 1), node.domain)
            except onnx.defs.SchemaError:
                continue
            for attribute in node.attribute:
                spec = schema.attributes.get(attribute.name)
                if spec is None or spec.default_value.type == onnx.AttributeProto.UNDEFINED:
                    continue
                default = onnx.helper.get_attribute_value(spec.default_value)
                if onnx.helper.get_attribute_value(attribute) == default:
                    found.append((node, attribute))
    return found


def _duplicate_shared_constants(model) -> int:
    """Give each branch its own copy of the small initializers it shares with the main graph."""
    import onnx

    main_inputs = {name for node in model.graph.node for name in node.input}
    shared = {
        init.name: init for init in model.graph.initializer
        if init.name in main_inputs and init.data_location != onnx.TensorProto.EXTERNAL
        and len(init.SerializeToString()) <= MAX_DUPLICATED_BYTES
    }
    count = 0
    for index, graph in enumerate(list(walk_graphs(model.graph))[1:]):
        local = {o for node in graph.node for o in node.output} | {i.name for i in graph.initializer}
        used = [name for name in dict.fromkeys(n for node in graph.node for n in node.input)
                if name in shared and name not in local]
        for name in used:
            copy = f"{name}__branch{index}"
            constant = onnx.helper.make_node("Constant", [], [copy], value=shared[name])
            for node in graph.node:
                node.input[:] = [copy if n == name else n for n in node.input]
            graph.node.insert(0, constant)
            count += 1
    return count


def apply_tensorrt_profile(model) -> dict[str, int]:
    """Rewrite an ``onnx.ModelProto`` in place for TensorRT's parser; returns counts of what changed.

    Raises ValueError if the opset is above :data:`TENSORRT_MAX_OPSET` or a refused op remains."""
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > TENSORRT_MAX_OPSET:
        raise ValueError(f"the TensorRT profile needs opset <= {TENSORRT_MAX_OPSET}, the file has {opset}")
    refused = sorted({n.op_type for g in walk_graphs(model.graph) for n in g.node} & TENSORRT_REFUSED_OPS)
    if refused:
        raise ValueError(f"the TensorRT profile cannot keep the ops {refused}: export with a lower opset")
    dropped = default_valued_attributes(model)
    for node, attribute in dropped:
        node.attribute.remove(attribute)
    return {"default_attributes_dropped": len(dropped), "constants_duplicated": _duplicate_shared_constants(model)}
