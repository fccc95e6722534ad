"""Every config key, with its default and a one-line meaning.

The defaults are the CPU-sized model that `llm-jax train` trains with no arguments: about
3.3 million parameters, on the Python standard library's own source, in a few minutes on
a 2-core laptop. Other configs start from `get_config()` here and change values; a key that
is not declared here is an error everywhere (config files and `--config.KEY=VALUE`).
"""

import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  del variant  # base has a single variant
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 512  # embedding rows; a trained tokenizer gets this size, a given one at most it
  m.d_model = 256  # width of the residual stream
  m.num_layers = 4  # transformer blocks
  m.num_heads = 4  # query heads
  m.head_dim = 0  # width of each query and key/value head (0: d_model / num_heads)
  m.num_kv_heads = 2  # key/value heads (grouped-query attention); must divide num_heads
  m.mlp_dim = 768  # hidden width of the SwiGLU MLP
  m.context_length = 128  # tokens per training sequence
  m.rope_theta = 10_000.0  # base of the rotary position embedding frequencies
  m.rope_scaling = "none"  # none, or llama3: Llama 3.1 long-context frequencies (keys below)
  m.rope_scaling_factor = 8.0  # llama3: long wavelengths are stretched by this factor
  m.rope_low_freq_factor = 1.0  # llama3: wavelengths over original_context / this are stretched
  m.rope_high_freq_factor = 4.0  # llama3: wavelengths under original_context / this are kept
  m.rope_original_context = 8192  # llama3: context length the unscaled frequencies were trained on
  m.norm_eps = 1e-5  # epsilon of RMSNorm
  m.tie_embeddings = True  # share the input embedding with the output projection
  m.dtype = "float32"  # compute dtype of activations and matmuls (float32 or bfloat16)
  m.param_dtype = "float32"  # storage dtype of parameters and optimizer state
  m.scan_layers = True  # run blocks under nn.scan (one compiled block, fast compiles)
  m.remat_policy = "none"  # activation recomputation: none, full, dots, dots_no_batch
  m.attention = "auto"  # kernel: xla, xla_blocked, cudnn; auto: cudnn on GPU, xla_blocked on CPU
  m.attention_block_size = 64  # query block of xla_blocked attention (64 measured fastest on CPU)
  m.scan_unroll = 0  # layers per scan iteration (0: all on CPU, 1 on accelerators); same params
  m.reward_head = False  # a scalar score per position instead of next-token logits (reward models)
  m.matmul_precision = "auto"  # float32 or bfloat16 matmul operands; auto: bfloat16 on CPUs with bf16 dots

  c.train = t = ml_collections.ConfigDict()
  t.steps = 800  # optimizer steps in the whole run (the schedule's length)
  t.batch_size = 16  # global batch in sequences, summed over all devices and hosts
  t.grad_accum_steps = 1  # microbatches per step; batch_size must divide by it
  t.learning_rate = 3e-3  # peak learning rate after warmup
  t.warmup_steps = 40  # linear warmup from 0 to learning_rate
  t.min_lr_ratio = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
  t.weight_decay = 0.1  # AdamW decoupled weight decay, applied to dense kernels only
  t.b1 = 0.9  # AdamW first-moment decay
  t.b2 = 0.95  # AdamW second-moment decay
  t.eps = 1e-8  # AdamW epsilon
  t.grad_clip = 1.0  # clip gradients to this global norm (0 disables clipping)
  t.seed = 0  # seed of parameter init, data order and sampling
  t.init_from = ""  # run directory (or its checkpoints/STEP) whose parameters start a new run
  t.model_from_init = False  # take the model keys (but execution-only ones) from init_from's run
  t.log_every = 10  # steps between rows of metrics.jsonl
  t.eval_every = 200  # steps between validation evaluations (0: only at the end)
  t.eval_tokens = 16_384  # validation input positions per evaluation (same set every time)
  t.checkpoint_every = 200  # steps between checkpoints (0: only at the end)
  t.checkpoint_minutes = 0.0  # also save when this many minutes passed since the last save (0: off)
  t.keep_checkpoints = 2  # newest checkpoints kept on disk
  t.keep_steps = []  # steps whose checkpoints are kept forever, e.g. [1000, 5000]
  t.on_nonfinite = "stop"  # NaN/Inf loss or gradients: 'stop' (exit 2) or 'skip' the update
  t.sample_prompt = "def "  # prompt of the sample printed at the end of a run
  t.sample_tokens = 96  # tokens generated for that sample (0: no sample)
  t.sample_temperature = 0.7  # sampling temperature of that sample (0: greedy)

  c.objective = o = ml_collections.ConfigDict()
  o.name = "next_token"  # next_token (pretraining, SFT), reward (a reward model), dpo or grpo
  o.reward_centering = 0.0  # reward: weight of (r_chosen + r_rejected)^2, keeping rewards near 0
  o.dpo_beta = 0.1  # dpo: how strongly the policy is held to the reference (init_from) model

  c.rl = r = ml_collections.ConfigDict()  # objective.name=grpo: RL from generated answers
  r.reward = ""  # 'module:function', 'file.py:function' or a reward-model run; 'A=2; B=1' weighs
  r.reward_errors = "stop"  # a reward that raises or is not finite: 'stop' the run or score 'zero'
  r.group_size = 8  # completions sampled per prompt (at least 2), each judged against the others
  r.max_completion_tokens = 64  # a completion's token limit; a prompt must fit in the rest
  r.temperature = 1.0  # sampling temperature of the rollouts
  r.top_p = 1.0  # nucleus of the rollouts' sampling (1: off)
  r.clip_epsilon = 0.2  # the new/old probability ratio's clip range [1 - eps, 1 + eps]
  r.kl_beta = 0.04  # weight of the k3 KL to the reference (init_from); 0 keeps no reference
  r.passes = 1  # optimisation passes (mu) over each batch of rollouts
  r.eval_prompts = 64  # validation prompts answered greedily at each evaluation

  c.data = d = ml_collections.ConfigDict()
  d.source = "builtin"  # builtin, files:<glob>, tfds:<name>, chat:, preferences: or prompts:<glob>
  d.mixture = ""  # 'SOURCE=WEIGHT; ...' with weights as token shares; '' reads data.source
  d.text_key = "text"  # field holding the text in .jsonl lines and TFDS features
  d.tfds_data_dir = ""  # where tfds: datasets are prepared ('' is TFDS's default directory)
  d.tokenizer = ""  # path of an existing SentencePiece model, or '' to train one
  d.chat_truncate = False  # a chat longer than the context: dropped, or (True) cut after an answer that fits
  d.val_fraction = 0.02  # share of documents held out for validation, chosen by path hash
  d.tokenizer_sample_bytes = 4_000_000  # training-split text sampled to train a tokenizer

  c.mesh = x = ml_collections.ConfigDict()
  x.data = 1  # pure data-parallel replicas (-1: all remaining devices)
  x.fsdp = -1  # data parallel with sharded params and optimizer state (-1: remaining)
  x.tensor = 1  # tensor (model) parallel over heads, MLP and vocabulary (-1: remaining)

  c.distributed = dd = ml_collections.ConfigDict()
  dd.coordinator_address = ""  # HOST:PORT of process 0 ('': detect SLURM / TPU VM, or 1 process)
  dd.num_processes = 0  # processes in the run, one per host or per GPU (0: detect)
  dd.process_id = -1  # this process's rank in 0..num_processes-1 (-1: detect)
  dd.initialization_timeout = 300  # seconds to wait for every process to reach the coordinator

  return c
