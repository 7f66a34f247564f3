"""The configuration's schema: one typed dataclass per section, each key with its default, its one-line
meaning (``python train.py --help`` prints them) and, where it has one, the sign every value must have.

Loading, overrides and validation live in :mod:`jaxllm.core.config`, which re-exports these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

POSITIVE, NON_NEGATIVE = "positive", ">= 0"
INT32_MAX = 2**31 - 1


def option(default: Any, help: str, sign: str | None = None) -> Any:
    """A config key: its default, the one-line meaning ``--help`` prints, and optionally the sign every
    value must have (:data:`POSITIVE` or :data:`NON_NEGATIVE`), checked as the value is set."""
    return field(default=default, metadata={"help": help, "sign": sign})


@dataclass
class RunConfig:
    dir: str = option("runs/tiny", "run directory: config, metrics, plots, checkpoints (resumes if present)")
    compile_cache: str = option(
        "~/.cache/jaxllm/xla",
        "folder of compiled programs reused by later runs of the same "
        "shapes (skips compilation); '' = off; JAX_COMPILATION_CACHE_DIR, when set, wins",
    )
    allow_changes: bool = option(
        False,
        "resume a run under keys that change its trajectory (optim.lr, train.seed, train.batch_size, ...); "
        "the changes are recorded in metrics.jsonl and config.yaml's history. Without it such a resume is refused",
    )


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps", POSITIVE)
    batch_size: int = option(16, "sequences per micro-batch, global over all devices and hosts", POSITIVE)
    seq_len: int = option(128, "tokens per training sequence (the context length)", POSITIVE)
    seed: int = option(0, "seed of initialisation, data order and dropout", NON_NEGATIVE)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", POSITIVE)


@dataclass
class MoEConfig:
    n_experts: int = option(0, "experts per mixture-of-experts block; 0 = dense MLPs (jaxllm.model.moe)", NON_NEGATIVE)
    top_k: int = option(2, "experts each token is sent to", POSITIVE)
    every: int = option(1, "an MoE block every k layers (the k-th of each group), dense MLPs between", POSITIVE)
    d_ff: int = option(0, "hidden width of one expert; 0 = model.d_ff", NON_NEGATIVE)
    shared_experts: int = option(
        0,
        "experts every token also goes through, unrouted and unweighted (DeepSeekMoE's "
        "shared experts): one dense MLP of shared_experts x the expert width",
        NON_NEGATIVE,
    )
    capacity_factor: float = option(
        0.0,
        "tokens an expert takes, as a multiple of its even share; beyond it they "
        "are dropped (counted); 0 = dropless (grouped matmul)",
        NON_NEGATIVE,
    )
    aux_loss: float = option(
        0.01, "weight of the load-balancing loss (Switch/GShard: n_experts sum_e f_e p_e)", NON_NEGATIVE
    )
    router_z_loss: float = option(
        0.001, "weight of the router z-loss (mean squared log-sum-exp of router logits)", NON_NEGATIVE
    )


@dataclass
class ModelConfig:
    arch: str = option("gpt2", "gpt2 (LayerNorm, GELU, learned positions, biases) | llama (RMSNorm, SwiGLU, RoPE, GQA)")
    n_layer: int = option(4, "transformer blocks", POSITIVE)
    d_model: int = option(128, "width of the residual stream", POSITIVE)
    n_head: int = option(4, "attention (query) heads", POSITIVE)
    n_kv_head: int = option(0, "key/value heads for grouped-query attention; 0 = n_head", NON_NEGATIVE)
    d_ff: int = option(0, "MLP hidden width; 0 = 4*d_model (gpt2) or 8/3*d_model rounded to 64 (llama)", NON_NEGATIVE)
    vocab_size: int = option(
        0,
        "embedding rows; 0 = the tokenizer's size rounded up to a multiple of 64; "
        "larger pads (e.g. to divide by mesh.tensor)",
        NON_NEGATIVE,
    )
    max_seq_len: int = option(
        0, "longest sequence the model accepts (learned positions, RoPE tables); 0 = train.seq_len", NON_NEGATIVE
    )
    residual: bool = option(True, "keep the skip connections; false is the no-residual ablation")
    norm_position: str = option("pre", "pre (pre-LN, modern) | post (post-LN, the original transformer)")
    dropout: float = option(0.0, "dropout rate on attention and MLP outputs and embeddings")
    dtype: str = option("float32", "compute dtype: float32 | bfloat16 | float16 (parameters stay float32)")
    remat: str = option(
        "none",
        "what a block keeps for its backward pass (jax.checkpoint policies): none (everything, no "
        "recompute) | full (its input alone; the whole block recomputed) | dots (every matmul output, "
        "attention scores included; only elementwise work recomputed) | dots_no_batch (the projections' "
        "outputs, not the attention scores) | offload (dots_no_batch's, moved to host memory; backends "
        "with a pinned_host memory)",
    )
    loss_chunk: int = option(
        0,
        "fused loss: positions per block of the head and cross-entropy, computed and differentiated a "
        "block at a time so the [B, T, V] float32 logits never exist; must divide train.seq_len; 0 = off",
        NON_NEGATIVE,
    )
    matmul_dtype: str = option(
        "default",
        "default (model.dtype) | fp8: the blocks' projections in float8 e4m3 (gradients e5m2), each "
        "operand scaled by its own current absolute maximum (stateless, no history to checkpoint); "
        "parameters, optimizer, attention core, head and loss unchanged",
    )
    scan_unroll: int = option(
        1,
        "blocks per iteration of the layer loop; n_layer unrolls it (small models run faster, compile slower)",
        POSITIVE,
    )
    tie_embeddings: bool = option(True, "share the token embedding with the output projection")
    rope_theta: float = option(10000.0, "RoPE base frequency (llama)", POSITIVE)
    norm_eps: float = option(1e-5, "epsilon of LayerNorm / RMSNorm", POSITIVE)
    adapter_dim: int = option(
        0, "bottleneck adapter width after attention and MLP (fine-tuning, sft.method=adapter); 0 = none", NON_NEGATIVE
    )
    prompt_tokens: int = option(
        0,
        "learned vectors that replace the embeddings of the first prompt_tokens positions (prompt tuning, "
        "sft.method=prompt; jaxllm.load puts placeholders there); 0 = none",
        NON_NEGATIVE,
    )
    attention: str = option(
        "xla",
        "xla (scores materialised, T^2 memory) | chunked (blockwise online softmax, O(T) memory, "
        "any backend) | cudnn (GPU, bf16/fp16) | splash (TPU) | auto (the best this backend has)",
    )
    attention_block: int = option(512, "chunked attention: query and key block length (positions)", POSITIVE)
    moe: MoEConfig = field(
        default_factory=MoEConfig, metadata={"help": "mixture-of-experts blocks: model.moe.KEY, below"}
    )


@dataclass
class DataConfig:
    source: str = option(
        "stdlib",
        "a prepared dataset (its directory, or a URL fsspec opens: gs://, s3://, file://, ...; see "
        "python -m jaxllm.data.prepare), or a corpus prepared into data.cache_dir on first use: stdlib | a "
        "text file, folder or glob | .jsonl | synthetic:markov:...",
    )
    mixture: str = option(
        "",
        "a weighted mixture of sources, WEIGHT:SOURCE,... (e.g. 0.7:gs://b/web,0.3:/data/code; weights > 0, "
        "normalised), each source as data.source, all with one tokenizer; used instead of data.source; '' = none",
    )
    tokenizer: str = option(
        "byte",
        "byte | char | bpe (trained on the corpus) | path to a tokenizer.json; a prepared dataset must have "
        "been prepared with this one",
    )
    bpe_vocab_size: int = option(4096, "vocabulary size when data.tokenizer=bpe", POSITIVE)
    val_fraction: float = option(
        0.02, "share held out for validation when preparing: whole files, or the tail of a single file"
    )
    cache_dir: str = option("", "where corpora named by data.source are prepared; '' = ~/.cache/jaxllm")
    document_mask: bool = option(
        False, "attention stays within each document (segment ids and positions from the end-of-document id)"
    )
    prefetch: int = option(2, "batches built ahead of the step on a background thread; 0 = when due", NON_NEGATIVE)


@dataclass
class OptimConfig:
    lr: float = option(1e-3, "peak learning rate", POSITIVE)
    min_lr: float = option(1e-4, "learning rate at the end of the decay", NON_NEGATIVE)
    warmup_steps: int = option(100, "linear warmup steps from 0 to optim.lr", NON_NEGATIVE)
    schedule: str = option("cosine", "cosine | wsd (warmup-stable-decay) | linear | constant")
    decay_fraction: float = option(0.2, "wsd: share of steps spent decaying at the end")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay, applied to weight matrices only", NON_NEGATIVE)
    b1: float = option(0.9, "Adam beta1", NON_NEGATIVE)
    b2: float = option(0.95, "Adam beta2", NON_NEGATIVE)
    eps: float = option(1e-8, "Adam epsilon", NON_NEGATIVE)
    clip_norm: float = option(1.0, "clip the global gradient norm to this; 0 = no clipping", NON_NEGATIVE)
    shard_state: bool = option(False, "ZeRO-1: shard the optimizer state over the data axes")


@dataclass
class EvalConfig:
    every: int = option(200, "evaluate every N steps (and at the end)", POSITIVE)
    batches: int = option(20, "validation batches per evaluation", POSITIVE)
    sample_tokens: int = option(200, "tokens generated as a sample at each evaluation; 0 = none", NON_NEGATIVE)
    sample_prompt: str = option("", "prompt of the sample; '' = the start of the validation text")
    temperature: float = option(0.8, "sampling temperature of the sample", NON_NEGATIVE)
    top_k: int = option(0, "sample only from the k most likely tokens; 0 = all", NON_NEGATIVE)
    tasks: str = option(
        "",
        "lm-evaluation-harness tasks scored at each evaluation, comma-separated (the harness's registry, "
        "or eval.tasks_include_path's files); '' = none. Needs the eval extra: pip install -e \".[eval]\"",
    )
    tasks_include_path: str = option("", "a directory of local task YAML files for eval.tasks; '' = none")
    tasks_limit: int = option(0, "examples per task at each evaluation; 0 = all", NON_NEGATIVE)
    tasks_num_fewshot: int = option(-1, "examples in each task's prompt; -1 = the task's own")
    tasks_batch_size: int = option(8, "requests per forward pass of the task evaluation", POSITIVE)


@dataclass
class LogConfig:
    every: int = option(10, "log metrics every N steps", POSITIVE)
    peak_flops: float = option(
        0.0, "peak FLOP/s of one device for MFU; 0 = built-in table by device kind", NON_NEGATIVE
    )
    tensorboard: bool = option(True, "write TensorBoard events into run.dir/tb")
    progress: bool = option(True, "show a progress bar")


@dataclass
class CheckpointConfig:
    every: int = option(500, "save every N steps (and at the end, and on SIGTERM/SIGINT)", POSITIVE)
    keep: int = option(2, "checkpoints kept", POSITIVE)


@dataclass
class MeshConfig:
    data: int = option(-1, "data-parallel ways; -1 = the devices the other axes leave (yields to another axis's -1)")
    fsdp: int = option(
        1, "FSDP / ZeRO-3 ways: parameters and optimizer state sharded; -1 = the devices the other axes leave"
    )
    tensor: int = option(
        1, "tensor-parallel ways: heads, MLP hidden and vocabulary split; -1 = the devices the other axes leave"
    )
    pipe: int = option(1, "pipeline stages; -1 = the devices the other axes leave")
    context: int = option(
        1, "context-parallel ways: the sequence split over devices (zig-zag), keys/values gathered", POSITIVE
    )
    expert: int = option(
        1, "expert-parallel ways: the experts of MoE blocks split over devices (and the batch with them)", POSITIVE
    )
    sequence_parallel: bool = option(False, "shard activations along seq over the tensor axis outside attention/MLP")
    rules: dict | None = option(None, "overrides of the logical-axis rules, e.g. {embed: null, mlp: [tensor, fsdp]}")


@dataclass
class PipelineConfig:
    microbatches: int = option(
        0, "micro-batches each batch is split into when mesh.pipe > 1; 0 = mesh.pipe", NON_NEGATIVE
    )
    schedule: str = option(
        "gpipe",
        "gpipe (all forwards, then all backwards) | circular (layers go round the pipe) | "
        "1f1b (one forward, one backward per iteration: stage inputs of < 2P micro-batches live, not M)",
    )
    repeats: int = option(1, "circular: rounds through the pipe, i.e. non-adjacent layer chunks per stage", POSITIVE)


@dataclass
class DistConfig:
    coordinator: str = option(
        "", "host:port of process 0 (multi-host); auto = from SLURM / Open MPI / TPU pod; '' = one process"
    )
    num_processes: int = option(1, "processes in a multi-host run", POSITIVE)
    process_id: int = option(0, "this process's index", NON_NEGATIVE)
    cpu_devices: int = option(
        0,
        "JAX devices the host CPU is split into (XLA's CPU backend runs a small model faster as one "
        "device per core, data-parallel, than as one multi-threaded device); 0 = JAX's default; "
        "JAX_NUM_CPU_DEVICES, when set, wins; GPU and TPU runs ignore it",
        NON_NEGATIVE,
    )


@dataclass
class DistillConfig:
    teacher: str = option("", "run directory of a trained teacher to distil from (frozen); '' = no distillation")
    temperature: float = option(2.0, "softmax temperature of teacher and student in the KL term", POSITIVE)
    alpha: float = option(0.5, "loss = (1 - alpha) next-token loss + alpha temperature^2 KL(teacher || student)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# --------------------------------------------------------------------------- fine-tuning (sft.py)


class InitConfig:
    """Where fine-tuning starts. The key is ``init.from``; ``from`` is a Python keyword, so the field is
    declared by name below and the dataclass gets no generated ``__init__``/``__repr__`` (which would
    spell ``self.from``)."""


InitConfig.__annotations__ = {"from": str}
setattr(
    InitConfig,
    "from",
    option("runs/tiny", "a jaxllm run directory, or a Hugging Face model directory (config.json + *.safetensors)"),
)
InitConfig = dataclass(init=False, repr=False, eq=False)(InitConfig)


@dataclass
class SFTSection:
    method: str = option("full", "full | lora | prompt (prompt tuning) | adapter (bottleneck adapters)")
    data: str = option("tasks", "tasks (the built-in instruction tasks) | a .jsonl of Alpaca or chat records")
    n_train: int = option(4000, "built-in tasks: training examples per task", POSITIVE)
    n_eval: int = option(50, "held-out examples per task (JSONL: every 20th record) scored by exact match", POSITIVE)
    max_new_tokens: int = option(24, "longest greedy answer generated at evaluation", POSITIVE)


@dataclass
class LoRAConfig:
    rank: int = option(8, "rank r of the update W + (alpha/r) A B", POSITIVE)
    alpha: float = option(16.0, "scale numerator of the update")
    targets: str = option("q,v", "comma-separated projections among q, k, v, o, gate, up, down")
    lr: float = option(
        0.0, "peak learning rate with sft.method=lora; 0 = optim.lr (optim.min_lr scales with it)", NON_NEGATIVE
    )


@dataclass
class PromptConfig:
    n_virtual_tokens: int = option(16, "learned embeddings placed before every example", POSITIVE)
    lr: float = option(
        0.0, "peak learning rate with sft.method=prompt; 0 = optim.lr (optim.min_lr scales with it)", NON_NEGATIVE
    )


@dataclass
class AdapterConfig:
    dim: int = option(32, "bottleneck width of the adapters after attention and after the MLP", POSITIVE)
    lr: float = option(
        0.0, "peak learning rate with sft.method=adapter; 0 = optim.lr (optim.min_lr scales with it)", NON_NEGATIVE
    )


@dataclass
class SFTConfig(Config):
    """Fine-tuning: the pre-training sections (``model`` and ``data`` come from ``init.from``) plus these."""

    init: InitConfig = field(default_factory=InitConfig)
    sft: SFTSection = field(default_factory=SFTSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
