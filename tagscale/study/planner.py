"""The memory and throughput model of a tagscale run: per-GPU memory by part and expected tokens/s for a frozen
base, before renting the GPUs. Pure arithmetic, torch-free (docs/planner.md has the formulas and the
measured-vs-predicted check); `tools/plan.py` is its command line (its text: plan_text.py), tools/measure_memory.py
and the tests call it. The accelerators it knows are in devices.py.

The base is a shape preset (7b, 13b, 34b, 70b or any tagscale.shapes.SHAPES name), a Hugging Face folder with a
config.json, or ``embedded:<name>``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace

from tagscale.shapes import Shape
from tagscale.study.devices import DEVICES

GIB = 1024**3

# ----------------------------------------------------------------------------------------------------------------
# Measured constants (docs/planner.md tells how each was measured)

# Bytes saved for backward per token per decoder layer of a frozen LLaMA layer (SDPA, no checkpointing): fitted on
# torch 2.13 CPU with saved_tensors_hooks over shapes varying hidden h, intermediate I and kv width separately;
# every fitted shape is reproduced to within 1%. bf16 keeps extra fp32 copies inside RMSNorm, hence the larger
# per-h coefficient. 7B in bf16: 33.2 B per token*hidden*layer.
SAVED_PER_TOKEN_LAYER = {  # bytes = h_coef*h + i_coef*I + kv_coef*kv_width + const
    "bf16": {"h": 13.07, "I": 6.0, "kv": 4.0, "const": 69.0},
    "fp32": {"h": 17.06, "I": 12.0, "kv": 8.0, "const": 154.0},
}
# With full (per-layer) checkpointing only each layer's input (+ rotary tables) is saved: bytes per token*h*layer.
CHECKPOINT_BOUNDARY_PER_TOKEN_H = {"bf16": 3.0, "fp32": 5.0}
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
TRAINABLE_BYTES = 16  # per tag/head parameter: fp32 master 4 + Adam m 4 + v 4 + param 2 + grad 2 (fp32: 4+4+4+4)

# Host process baseline on CPU (Python + torch + transformers + deepspeed + gloo + tokenizer + data) per rank,
# measured as the peak RSS of the `tiny` preset run (the weights are ~0.1 MB there); see docs/planner.md.
CPU_RUNTIME_BYTES = {1: int(0.49 * GIB), 2: int(0.62 * GIB)}  # by ranks on the host (the 2-rank launch adds shm/gloo)


# ----------------------------------------------------------------------------------------------------------------
# The configuration and the plan

@dataclass(frozen=True)
class Setup:
    """How the run is laid out: hardware, ZeRO, precision, sequence, trainables, DeepSpeed buckets."""

    gpu: str = "H100"
    gpus_per_node: int = 8
    nodes: int = 1
    seq: int = 2048
    micro_batch: int = 1
    zero: int = 3
    offload: str = "none"  # none | param (ZeRO-3 offload_param to CPU)
    checkpointing: str = "none"  # none | full (every decoder layer recomputed in backward)
    dtype: str = "bf16"
    mfu: float = 0.45
    tag_vectors: int = 20  # all trainable tag vectors (e.g. a domain and a function tag of p = 10)
    head_outputs: int = 1
    prefetch_bucket: float = 5e7  # stage3_prefetch_bucket_size (elements)
    max_live: float = 1e9  # stage3_max_live_parameters
    max_reuse: float = 1e9  # stage3_max_reuse_distance
    reduce_bucket: float = 5e8  # reduce_bucket_size: ZeRO-3's contiguous-gradient buffer (allocated whole on a GPU)
    persistence: float = 1e5  # stage3_param_persistence_threshold: smaller parameters are replicated, never gathered
    accumulation: int = 1  # micro-batches per rank per optimizer step
    text_task: bool = False  # stage 1 / text targets call the LM head (gathered too); head tasks never do

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class Plan:
    """The answer: bytes per GPU by part, their sum, and the expected speed."""

    base: str
    parameters: int
    layer_parameters: int
    trainable_parameters: int
    setup: dict
    memory_bytes: dict[str, int]
    peak_bytes: int
    device_memory_bytes: int
    fits: bool
    host_bytes_per_rank: int
    flops_per_token: float
    compute_s_per_micro: float
    allgather_s_per_micro: float
    tokens_per_s_per_gpu: float
    tokens_per_s: float
    bound: str
    cross_node_bytes_per_step: int = 0  # ZeRO-3 traffic over the node boundary per optimizer step (all links)
    cross_node_bytes_per_step_hpz: int = 0  # the same with ZeRO++ hpZ (zero_hpz_partition_size = GPUs per node)
    cross_node_bytes_first_step_hpz: int = 0  # hpZ's first step, which still gathers across nodes
    notes: list[str] = field(default_factory=list)


def trainable_parameters(shape: Shape, setup: Setup) -> int:
    """What the optimizer trains: the tag vectors (hidden wide each) and the heads (a hidden-to-outputs linear layer
    with its bias); the base is frozen."""
    return setup.tag_vectors * shape.hidden + setup.head_outputs * (shape.hidden + 1)


def activation_bytes(shape: Shape, setup: Setup) -> int:
    """Saved activations of one micro-batch (backward to the inputs only: the base is frozen)."""
    tokens = setup.seq * setup.micro_batch
    coef = SAVED_PER_TOKEN_LAYER[setup.dtype]
    per_layer_token = coef["h"] * shape.hidden + coef["I"] * shape.intermediate + coef["kv"] * shape.kv_width \
        + coef["const"]
    if setup.checkpointing == "none":
        return int(tokens * shape.layers * per_layer_token)
    boundaries = tokens * shape.layers * CHECKPOINT_BOUNDARY_PER_TOKEN_H[setup.dtype] * shape.hidden
    return int(boundaries + tokens * per_layer_token)  # plus the one layer being recomputed


def gathered_bytes(shape: Shape, setup: Setup) -> int:
    """ZeRO-3's working set of whole (gathered) parameters at its largest: the forward/backward turn.

    After the first step DeepSpeed keeps a parameter gathered when its next use lies within max_reuse elements of
    fetches; the last layers' next use is their own backward, 2 layers apart per layer, so about
    max_reuse / (2 * layer) + 1 layers stay whole, plus the prefetch bucket ahead. The embedding lookup gathers the
    whole table at the start; the larger of the two is the peak.
    """
    if setup.zero != 3:
        return 0
    layer = shape.layer_params
    kept_layers = min(shape.layers, int(setup.max_reuse // (2 * layer)) + 1)
    turn = min(kept_layers * layer + min(setup.prefetch_bucket, layer), max(setup.max_live, layer))
    return int(DTYPE_BYTES[setup.dtype] * max(shape.embedding_params, turn))


def cross_node_bytes(shape: Shape, setup: Setup) -> tuple[int, int, int]:
    """Bytes crossing the node boundary per optimizer step: plain ZeRO-3, hpZ in steady state, hpZ's first step.

    A ring all-gather (NCCL's rings, gloo's allgather) over W ranks placed node by node crosses the boundary n times,
    each crossing carrying (W-1)/W of the gathered bytes. Per micro-batch ZeRO-3 gathers in forward every parameter
    the forward uses (embedding, layers, final norm; the LM head only for text tasks) and in backward the layers
    that were released in between. DeepSpeed does not release a parameter whose next use lies within
    max_reuse elements of fetches, nor one the prefetcher already looked past (partitioned_param_coordinator.py
    __params_to_release), so about (max_reuse + prefetch_bucket) / (2 * layer) + 1 layers stay whole through the
    turn: all of a small base (measured: the tiny base gathers nothing in backward even at max_reuse 0), about one
    layer of a 70B. Parameters under the persistence threshold are replicated and never gathered. The trainables'
    gradients (tags, heads: kilobytes) are reduce-scattered once per step in fp32. Not modelled: the step's small
    collectives (loss, metrics) and TCP/gloo framing, measured at ~75 KB per step on 2 nodes x 2 CPU ranks.
    hpZ keeps a secondary copy of each parameter sharded over the node's GPUs after its first gather, and gathers
    from it afterwards: inside the node. DeepSpeed drops the secondary copies only of parameters the optimizer
    updates (stage3.py invalidate_secondary_tensor), so for a frozen base only the first forward crosses nodes.
    """
    if setup.zero != 3 or setup.nodes == 1:
        return 0, 0, 0
    world, b = setup.world, DTYPE_BYTES[setup.dtype]
    ring = setup.nodes * (world - 1) / world
    gathered = lambda n: n if n >= setup.persistence else 0  # noqa: E731
    layer = sum(gathered(n) for n in _layer_tensors(shape))
    head = gathered(shape.embedding_params) if setup.text_task and not shape.tied_embeddings else 0
    norm = gathered(shape.hidden)  # the final norm
    forward = gathered(shape.embedding_params) + shape.layers * layer + norm + head
    kept = min(shape.layers, int((setup.max_reuse + setup.prefetch_bucket) // (2 * shape.layer_params)) + 1)
    backward = (shape.layers - kept) * layer + (norm + head if kept < shape.layers else 0)
    trainable = trainable_parameters(shape, setup)
    grads = ring * trainable * 4
    plain = ring * b * (forward + backward) * setup.accumulation + grads
    return int(plain), int(grads), int(ring * b * forward + grads)


def _layer_tensors(shape: Shape) -> list[int]:
    """Element counts of one decoder layer's tensors (ZeRO-3 gathers tensor by tensor)."""
    h, i = shape.hidden, shape.intermediate
    tensors = [h * shape.q_width, h * shape.kv_width, h * shape.kv_width, shape.q_width * h, h * i, h * i, i * h]
    tensors += [h] * shape.norms_per_layer + ([shape.head_dim, shape.head_dim] if shape.qk_norm else [])
    if shape.attention_bias:
        tensors += [shape.q_width, shape.kv_width, shape.kv_width]
    if shape.output_bias:
        tensors += [h]
    return tensors


def memory_by_part(shape: Shape, setup: Setup) -> tuple[dict[str, int], int]:
    """Bytes per GPU by part, and bytes of this rank's weights held in host memory instead (offload)."""
    b = DTYPE_BYTES[setup.dtype]
    weights = shape.total_params * b
    if setup.zero == 3:
        weights = math.ceil(shape.total_params / setup.world) * b
    host = 0
    if setup.offload == "param":
        host, weights = weights, 0
    trainable = trainable_parameters(shape, setup)
    on_cpu = setup.gpu == "CPU"
    # ZeRO-3 with contiguous gradients allocates a reduce bucket of reduce_bucket elements up front; on a GPU the
    # caching allocator holds all of it, on a CPU only the pages the (tiny) trainable gradients touch are resident.
    bucket = setup.reduce_bucket * b if setup.zero == 3 and not on_cpu else (trainable * b if setup.zero == 3 else 0)
    # A final hidden state and its gradient (fp32 for the head), the input embeddings and their gradient.
    edges = 4 * setup.seq * setup.micro_batch * shape.hidden * 4
    parts = {
        "weights (sharded)" if setup.zero == 3 else "weights (replicated)": int(weights),
        "gathered working set": gathered_bytes(shape, setup),
        "activations": activation_bytes(shape, setup),
        "tags + heads + optimizer": trainable * TRAINABLE_BYTES,
        "buffers": int(bucket + edges),
    }
    if on_cpu:
        parts["runtime (process baseline)"] = CPU_RUNTIME_BYTES[2 if setup.world > 1 else 1]
    return parts, host


def plan(shape: Shape, setup: Setup) -> Plan:
    """Memory per GPU and expected throughput of `setup` on `shape`."""
    device = DEVICES[setup.gpu]
    parts, host = memory_by_part(shape, setup)
    peak = sum(parts.values())
    if setup.gpu == "CPU":
        capacity = int(_host_ram_bytes() / setup.gpus_per_node)  # ranks on one host share its RAM
    else:
        capacity = int(device.memory_gib * GIB)
    # FLOPs per token: 2N forward + 2N backward to the inputs (no weight gradients: frozen), + 2N recompute with
    # checkpointing; attention's score and value products (causal: average context seq/2) add 2*L*seq*q_width
    # forward and twice that backward.
    c = 6 if setup.checkpointing == "full" else 4
    attention = (8 if setup.checkpointing == "full" else 6) * shape.layers * setup.seq * shape.q_width
    flops_per_token = c * shape.matmul_params + attention
    tokens = setup.seq * setup.micro_batch
    compute_s = flops_per_token * tokens / (device.peak_tflops * 1e12 * setup.mfu)
    allgather_s = 0.0
    if setup.zero == 3 and setup.world > 1:
        # Forward and backward each gather every weight once per micro-batch (accumulation does not amortise it).
        received = 2 * shape.total_params * DTYPE_BYTES[setup.dtype] * (setup.world - 1) / setup.world
        bandwidth = device.intra_node_gbs if setup.nodes == 1 else device.inter_node_gbs
        allgather_s = received / (bandwidth * 1e9)
    across, across_hpz, first_hpz = cross_node_bytes(shape, setup)
    step_s = max(compute_s, allgather_s)  # overlap_comm: the slower of the two sets the pace
    per_gpu = tokens / step_s
    notes = []
    if setup.zero in (1, 2):
        notes.append("ZeRO 1/2 shard only optimizer state and gradients, which a frozen base does not have: "
                     "memory as ZeRO 0")
    if allgather_s > compute_s:
        notes.append(f"all-gather bound ({allgather_s:.3f} s vs {compute_s:.3f} s compute per micro-batch): "
                     f"raise seq x micro-batch to {_tokens_to_hide_comm(shape, setup, flops_per_token):,} tokens "
                     "per GPU, or avoid ZeRO-3 / use hpZ across nodes")
    if setup.gpu == "CPU":
        notes.append("CPU tokens/s is a rough guide (measured fp32 GEMM rate; no communication model for gloo)")
    return Plan(
        base=shape.name, parameters=shape.total_params, layer_parameters=shape.layer_params,
        trainable_parameters=trainable_parameters(shape, setup),
        setup=asdict(setup), memory_bytes=parts, peak_bytes=int(peak), device_memory_bytes=capacity,
        fits=peak <= 0.9 * capacity, host_bytes_per_rank=host, flops_per_token=flops_per_token,
        compute_s_per_micro=compute_s, allgather_s_per_micro=allgather_s, tokens_per_s_per_gpu=per_gpu,
        tokens_per_s=per_gpu * setup.world, bound="all-gather" if allgather_s > compute_s else "compute",
        cross_node_bytes_per_step=across, cross_node_bytes_per_step_hpz=across_hpz,
        cross_node_bytes_first_step_hpz=first_hpz, notes=notes)


def scoring_seconds(shape: Shape, setup: Setup, tokens: float) -> float:
    """Compute-bound seconds to score `tokens` with a forward pass only (probe features, validation and test
    scoring): 2 FLOPs per matmul parameter and the attention products' forward (2*L*seq*q_width per token, the
    forward third of `plan`'s 6*L*seq*q_width), at the setup's MFU. No all-gather or offload traffic is modelled."""
    device = DEVICES[setup.gpu]
    flops_per_token = 2 * shape.matmul_params + 2 * shape.layers * setup.seq * shape.q_width
    return tokens * flops_per_token / (device.peak_tflops * 1e12 * setup.mfu)


def _tokens_to_hide_comm(shape: Shape, setup: Setup, flops_per_token: float) -> int:
    device = DEVICES[setup.gpu]
    bandwidth = device.intra_node_gbs if setup.nodes == 1 else device.inter_node_gbs
    received = 2 * shape.total_params * DTYPE_BYTES[setup.dtype] * (setup.world - 1) / setup.world
    per_token_s = flops_per_token / (device.peak_tflops * 1e12 * setup.mfu)
    return int(math.ceil(received / (bandwidth * 1e9) / per_token_s))


def _host_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


# Candidates from fastest to most frugal: a replicated bf16 base has no all-gathers at all, so ZeRO-3 is used only
# where the base (plus activations) does not fit one GPU, checkpointing only where activations do not fit, and
# parameter offload last.
CANDIDATES = [
    dict(zero=0, checkpointing="none", offload="none"),
    dict(zero=0, checkpointing="full", offload="none"),
    dict(zero=3, checkpointing="none", offload="none"),
    dict(zero=3, checkpointing="full", offload="none"),
    dict(zero=3, checkpointing="full", offload="param"),
]


def recommend(shape: Shape, setup: Setup) -> tuple[Plan, str]:
    """The first candidate that fits in 90% of a GPU's memory, and why it was chosen."""
    for candidate in CANDIDATES:
        chosen = plan(shape, replace(setup, **candidate))
        if chosen.fits:
            break
    else:
        return chosen, (f"nothing fits: even ZeRO-3 + checkpointing + parameter offload needs "
                        f"{chosen.peak_bytes / GIB:.1f} GiB per GPU; lower seq x micro-batch or add GPUs")
    s = chosen.setup
    bf16 = shape.total_params * DTYPE_BYTES[setup.dtype] / GIB
    if s["zero"] == 0:
        why = f"the {setup.dtype} base ({bf16:.1f} GiB) fits on one GPU: replicate it (ZeRO 0, no all-gathers)"
    else:
        why = f"the {setup.dtype} base ({bf16:.1f} GiB) plus activations does not fit on one GPU: ZeRO-3 over " \
              f"{setup.world} GPUs"
    if s["checkpointing"] == "full":
        why += "; activations need full checkpointing"
    if s["offload"] == "param":
        why += "; weights offloaded to CPU"
    if chosen.bound == "all-gather":
        why += "; all-gather bound: see the note"
    return chosen, why
