"""Defaults of the main job's config; each `configs/wXaY.py` sets the bits and method."""
import ml_collections



def base_config(w_bits: int, a_bits: int, method: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = method  # rtn | vidit_q | q_vdit | qvd | s2q (s2q_jax.methods)
  c.workdir = f"workdir/w{w_bits}a{a_bits}_{method}"
  c.seed = 0
  c.compilation_cache = "~/.cache/s2q_jax/xla"  # '' to disable JAX's persistent compile cache

  c.model = ml_collections.ConfigDict()
  # empty: the embedded model; a diffusers CogVideoX pipeline folder (model_index.json: real
  # prompts, videos decoded to pixels); or a transformer folder alone (diffusers or converted).
  c.model.path = ""
  c.model.dtype = "float32"

  c.quant = ml_collections.ConfigDict()
  c.quant.w_bits = w_bits
  c.quant.a_bits = a_bits
  # Unset (None): the architecture's defaults (`quant_defaults()` of its model class: e.g.
  # CogVideoX keeps its patch embedding and output projection in bf16 and gives the
  # timestep MLP 8-bit weights); a list of regexes replaces them.
  c.quant.keep_fp = ml_collections.config_dict.placeholder(list)
  # ((regex on the layer path, "wXaY" or "wXafp"), ...); first match wins, e.g. adding
  # (r"^transformer_blocks\.0\.", "w8a8") keeps the first block at 8 bits; () quantizes
  # the timestep MLP and final modulation to the default bits as well.
  c.quant.overrides = ml_collections.config_dict.placeholder(tuple)

  # S²Q-VDiT (method=s2q): calibration data selection and block-wise distillation.
  c.calib = ml_collections.ConfigDict()
  c.calib.num_prompts = 8  # prompts whose every denoising step enters the candidate pool
  c.calib.num_samples = 40  # model inputs calibrated on (paper: 40), null-prompt twins included
  c.calib.uncond = True  # each chosen step also gives its null-prompt (CFG) input, every method
  # salient_stratified: the top C = C̄_diff·C̄_quant within each of `bands` timestep bands |
  # salient: the paper's literal global top-N | uniform | random (ablations)
  c.calib.selection = "salient_stratified"
  # contiguous bands of sampler steps (salient_stratified); 0: one per chosen position, so
  # the chosen steps spread over the whole trajectory
  c.calib.bands = 0
  # contiguous: bands of consecutive steps | spread: one step per band, evenly spaced
  c.calib.band_layout = "contiguous"
  c.calib.band_quota = "equal"  # equal | salience: ∝ the band's mean diffusion salience
  c.calib.diffusion_salience = "latent"  # latent: ‖x_t − x_{t−1}‖²/‖x_t‖² | x0: change of x̂₀
  c.calib.salience = "input"  # input: ‖x_tᵀx_t‖₂ of the latent | layer: Σ over quantized layers
  c.calib.pool_path = ""  # where the candidate pool is cached ('' = <workdir>/pool.npz)
  # Calibration prompts, one per line (pipeline folders only; '' = the shipped
  # s2q_jax/assets/prompts/calibration.txt); the first calib.num_prompts are used.
  c.calib.prompts = ""

  # Several processes (hosts of a TPU pod or GPU cluster; CPU processes in tests), each
  # running this same command: their devices form one mesh; process 0 alone writes.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.coordinator = ""  # '': one process | host:port of process 0 | auto: discovered
  c.mesh.num_processes = ml_collections.config_dict.placeholder(int)  # with host:port
  c.mesh.process_id = ml_collections.config_dict.placeholder(int)  # 0 … num_processes − 1
  # Devices along the "model" axis of the (data, model) mesh: large parameters are split
  # over them (FSDP), so a model larger than one device fits; data = devices / model.
  c.mesh.model = 1

  c.distill = ml_collections.ConfigDict()
  c.distill.enabled = True
  c.distill.token_weighting = "attention"  # attention | uniform
  c.distill.lam_min = 0.5
  c.distill.lam_max = 1.0
  c.distill.epochs = 15
  c.distill.batch_size = 4
  c.distill.lr_clip = 5e-2  # weight clipping factors (paper: 5e-2)
  c.distill.act_clip = True  # learned activation clipping factor per layer, in [0.3, 1]
  c.distill.lr_act_clip = 5e-2  # (paper: 5e-2)
  c.distill.lr_smooth = 5e-3  # smoothing scales (paper: 5e-3)
  c.distill.smoothing = True
  c.distill.smooth_alpha = 0.5
  # kronecker: learned FlatQuant-style input transform P = P₁ ⊗ P₂ per layer | none
  c.distill.transform = "kronecker"
  c.distill.transform_init = "identity"  # identity | hadamard
  c.distill.lr_transform = 5e-3  # (paper: 5e-3)
  c.distill.rotation = False  # fixed Hadamard rotation of every quantized layer's input
  c.distill.gptq = True

  # Baselines (DESIGN §5); they share calib.num_prompts / num_samples and the pool.
  c.vidit_q = ml_collections.ConfigDict()
  c.vidit_q.alpha = 0.5  # balancing exponent: s = max|X|^α / max|W|^(1-α)
  c.vidit_q.timestep_ranges = 2  # separate balancing (and codes) per range of steps
  c.vidit_q.rotation = False  # Hadamard rotation after balancing

  c.q_vdit = ml_collections.ConfigDict()
  c.q_vdit.gamma = 100.0  # weight of the temporal (frame-similarity) KL term
  c.q_vdit.lr_estimator = 1e-3  # α, β and the per-frame M of the rank-1 branch
  c.q_vdit.epochs = 15

  c.qvd = ml_collections.ConfigDict()
  c.qvd.scri_beta = 0.5  # how far channel widths are pulled to the median (0: not at all)

  c.sampler = ml_collections.ConfigDict()
  # Unset (None): a pipeline's own (CogVideoXPipeline: 50 steps, guidance 6), else 25 and 5.
  c.sampler.num_steps = ml_collections.config_dict.placeholder(int)
  c.sampler.guidance_scale = ml_collections.config_dict.placeholder(float)
  # '': the model folder's scheduler_config.json when it has one, else CogVideoX-2B's DDIM;
  # or a diffusers class (e.g. CogVideoXDPMScheduler) applied to that config.
  c.sampler.scheduler = ""

  c.inference = ml_collections.ConfigDict()
  # '': quantized videos from the frozen in-memory model (the deployed integer arithmetic in
  # plain XLA); else reload the exported checkpoint and run it on these kernels:
  # auto | reference | xla_int8 | interpret | gpu | tpu | tpu_interpret.
  c.inference.backend = ""

  c.eval = ml_collections.ConfigDict()
  # 16: one video's PSNR moves by several dB with its noise; 8 left a standard error near
  # 1 dB, more than the gaps between good methods (README, "Results on the embedded model").
  c.eval.num_videos = 16
  # Evaluation prompts, one per line (pipeline folders only; '' = the shipped
  # s2q_jax/assets/prompts/eval.txt); the first eval.num_videos are used, and fewer is an error.
  c.eval.prompts = ""
  # Video size. Pipeline: the decoded video in pixels, unset = the pipeline's (the transformer's
  # sample size × the VAE's scale: 49 × 480 × 720 for CogVideoX). Otherwise: latents, 8 × 32 × 32.
  c.eval.frames = ml_collections.config_dict.placeholder(int)
  c.eval.height = ml_collections.config_dict.placeholder(int)
  c.eval.width = ml_collections.config_dict.placeholder(int)
  c.eval.gif_scale = ml_collections.config_dict.placeholder(int)  # unset: 1 for pixels, else 4
  c.eval.fp_videos_path = ""  # cache of the FP videos, shared by runs that compare methods
  return c
