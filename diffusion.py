"""Gaussian diffusion as DiT trains and samples it (Ho et al. 2020; Nichol & Dhariwal 2021, "IDDPM").

    from diffusion import create_diffusion
    diffusion = create_diffusion()                         # 1000 steps, for training
    diffusion = create_diffusion("250")                    # 250 respaced DDPM steps, paper §4.2
    x0 = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, model_kwargs=dict(y=y, cfg_scale=4.0))
    x0 = create_diffusion().dpm_solver_sample_loop(model.forward_with_cfg, z.shape, z, steps=20,
                                                   model_kwargs=dict(y=y, cfg_scale=4.0))   # DPM-Solver++(2M)
    x0 = create_diffusion().dpm_solver_sample_loop(..., sde=True)    # DPM-Solver++(2M) SDE (one noise draw a step)

Paper §3.1: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the learned reverse process
p(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2). The network predicts eps and, per pixel, where log sigma_t^2
lies between the posterior variance and beta_t ("learned range"). Training minimises the hybrid loss:
eps-MSE plus the variational bound in which the mean is detached, so the bound trains only the variance.

Numerics follow the official DiT diffusion: schedules in float64 numpy, gathered per timestep and only then
cast to float32, and exactly one torch.randn_like(x) per sampling step, so the same model, noise and seed
give the same samples. DPM-Solver++(2M) (Lu et al. 2022), not in the official code, takes the timesteps and
updates of diffusers' DPMSolverMultistepScheduler. Callers check the step counts they ask (sample.py's --steps); a
count a schedule still cannot take (no DDIM stride gives it; 1000 DPM-Solver++ steps) is a ValueError they word.
"""
import math

import numpy as np
import torch
from tqdm.auto import tqdm

# The steps of the schedule DiT is trained on (and its checkpoints with it): samplers keep a subset of them.
TRAINED_STEPS = 1000


def space_timesteps(num_timesteps, section_counts):
    """Which of the original steps a respaced sampler keeps.

    "ddimN": N evenly strided steps starting at 0 (the DDIM paper's spacing). Otherwise comma-separated counts, one
    per equal section of [0, T), each at most its section's size: each section keeps its count of evenly spaced
    steps, ends included (so "250" keeps 0, 4.01, 8.02, ... rounded, ending at 999).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} evenly strided steps out of {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride                 # accumulated, not multiplied: the official rounding
        start += size
    return set(kept)


def gather(arr, t, shape):
    """arr[t] (float64 numpy -> float32 torch) broadcast to `shape` = x's shape."""
    out = torch.from_numpy(arr).to(device=t.device)[t].float()   # (N,)
    return out.view(-1, *([1] * (len(shape) - 1))).expand(shape)


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of x in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)); DDPM's decoder."""
    cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))  # N(0, 1)'s, approx.
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = cdf(inv_stdv * (x - means + 1.0 / 255.0))       # the bin's upper edge
    cdf_min = cdf(inv_stdv * (x - means - 1.0 / 255.0))        # and its lower one
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),     # the end bins reach to -inf, +inf
                       torch.where(x > 0.999, torch.log((1.0 - cdf_min).clamp(min=1e-12)), log_cdf_delta))


class GaussianDiffusion:
    """A diffusion over a (possibly respaced) set of timesteps. `timestep_map[i]` is the original step the i-th kept
    step stands for; the model is always called with original steps, so a network trained on 1000 steps samples with
    250 or 50."""

    def __init__(self, betas, learn_sigma=True, timestep_map=None):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The variance is 0 at t = 0: clip its log to the t = 1 value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # -- forward process ---------------------------------------------------------------------------------
    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (paper §3.1)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (gather(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + gather(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (gather(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + gather(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, gather(self.posterior_variance, t, x_t.shape),
                gather(self.posterior_log_variance_clipped, t, x_t.shape))

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (gather(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    # -- the model's reverse step --------------------------------------------------------------------------
    def call_model(self, model, x, t, model_kwargs):
        t_orig = torch.from_numpy(self.timestep_map).to(t.device)[t]   # respaced index -> trained step
        return model(x, t_orig, **(model_kwargs or {}))

    def p_mean_variance(self, model_output, x, t):
        """Mean, log-variance and x_0 estimate of p(x_{t-1} | x_t), from the network's output at (x_t, t)."""
        if self.learn_sigma:
            eps, var_values = model_output.split(x.shape[1], dim=1)
            # Learned range: interpolate log-variance between the posterior's (min) and beta_t (max).
            min_log = gather(self.posterior_log_variance_clipped, t, x.shape)
            max_log = gather(np.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            # Fixed large variance (beta_t, with the posterior's at t = 0), as IDDPM's non-learned default.
            eps = model_output
            fixed = np.append(self.posterior_variance[1], self.betas[1:])
            log_variance = gather(np.log(fixed), t, x.shape)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(mean=mean, log_variance=log_variance, pred_xstart=pred_xstart)

    # -- training -----------------------------------------------------------------------------------------
    def vb_terms_bpd(self, x_start, x_t, t, model_output):
        """One term of the variational bound in bits per dim: KL(q || p) at t > 0, decoder NLL at t = 0."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        mean, logvar = out["mean"], out["log_variance"]
        # KL(N(true_mean, e^true_logvar) || N(mean, e^logvar)), elementwise, in nats
        kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                    + (true_mean - mean) ** 2 * torch.exp(-logvar))
        kl = mean_flat(kl) / math.log(2.0)
        nll = mean_flat(-discretized_gaussian_log_likelihood(x_start, mean, 0.5 * logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """IDDPM hybrid loss: eps-MSE + the bound with the mean detached (it trains only the variance)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = self.call_model(model, x_t, t, model_kwargs)
        if self.learn_sigma:
            eps, var_values = model_output.split(x_start.shape[1], dim=1)
            vb = self.vb_terms_bpd(x_start, x_t, t, torch.cat([eps.detach(), var_values], dim=1))   # mean frozen
            model_output = eps
        else:
            vb = torch.zeros_like(t, dtype=x_start.dtype)
        mse = mean_flat((noise - model_output) ** 2)
        return dict(vb=vb, mse=mse, loss=mse + vb)

    # -- DDPM sampling ------------------------------------------------------------------------------------
    def p_sample(self, model, x, t, model_kwargs=None, randn_like=None):
        """x_{t-1} ~ p(x_{t-1} | x_t): the mean plus sigma_t times one fresh randn_like(x) (none at t = 0)."""
        out = self.p_mean_variance(self.call_model(model, x, t, model_kwargs), x, t)
        noise = (randn_like or torch.randn_like)(x)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def p_sample_loop(self, model, shape, noise=None, model_kwargs=None, progress=False, device=None,
                      randn_like=None):
        """Ancestral sampling from x_T = noise (or fresh N(0, I)) down to x_0. randn_like: where each step's noise
        comes from (default: the global stream, as the official sampler; sample.ImageNoise: a stream per image)."""
        return self._loop(self.p_sample, model, shape, noise, model_kwargs, progress, device, randn_like)

    # -- DDIM sampling (eta = 0: deterministic given x_T) -------------------------------------------------
    def ddim_sample(self, model, x, t, model_kwargs=None, randn_like=None):
        """x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1}) eps_hat (DDIM eq. 12 with sigma = 0).

        It still draws one randn_like(x) per step and discards it, as the official sampler does with eta = 0,
        so DDPM and DDIM consume the random stream alike."""
        out = self.p_mean_variance(self.call_model(model, x, t, model_kwargs), x, t)
        eps = ((gather(self.sqrt_recip_alphas_cumprod, t, x.shape) * x - out["pred_xstart"])
               / gather(self.sqrt_recipm1_alphas_cumprod, t, x.shape))          # eps_hat from x0_hat
        abar_prev = gather(self.alphas_cumprod_prev, t, x.shape)
        (randn_like or torch.randn_like)(x)
        return out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev) * eps

    def ddim_sample_loop(self, model, shape, noise=None, model_kwargs=None, progress=False, device=None,
                         randn_like=None):
        return self._loop(self.ddim_sample, model, shape, noise, model_kwargs, progress, device, randn_like)

    # -- DPM-Solver++(2M): the probability-flow ODE in 10-25 network evaluations ------------------------
    def dpm_solver_timesteps(self, steps):
        """The original steps DPM-Solver++ calls the model at, from T - 1 down: `steps` points of
        linspace(0, T - 1, steps + 1), rounded, the 0 dropped (diffusers' "linspace" spacing; the step after the
        last one goes to sigma = 0). Call it on create_diffusion(""): DPM-Solver++ chooses its own timesteps."""
        if not 1 <= steps < self.num_timesteps:        # T steps would round two points onto one (h = 0)
            raise ValueError(f"DPM-Solver++ takes at most {self.num_timesteps - 1} steps (and at least 1)")
        return np.linspace(0, self.num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)

    def dpm_solver_sample_loop(self, model, shape, noise=None, steps=20, model_kwargs=None, progress=False,
                               device=None, sde=False, randn_like=None):
        """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, second order, data prediction.

        With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) and the data
        prediction x_theta(x_t, t) = (x_t - sigma_t eps_theta(x_t, t)) / alpha_t, the step from t_{i-1} to t_i is
            x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,
            D_i = (1 + 1 / (2 r_i)) x_theta(t_{i-1}) - 1 / (2 r_i) x_theta(t_{i-2}),
        with h_i = lambda_{t_i} - lambda_{t_{i-1}} and r_i = h_{i-1} / h_i; D_i = x_theta(t_{i-1}) (first order: DDIM)
        on the first step. The last step goes to sigma = 0 (lambda = +inf): the sample is the last data prediction.
        eps is the first C channels of the model's output; the ODE draws no noise.

        sde=True: DPM-Solver++(2M) SDE (diffusers' algorithm_type="sde-dpmsolver++", solver_type="midpoint"), the
        same D_i in the reverse diffusion SDE, its linear part solved exactly (variation of constants in lambda):
            x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) e^{-h_i} x_{t_{i-1}} + alpha_{t_i} (1 - e^{-2 h_i}) D_i
                      + sigma_{t_i} sqrt(1 - e^{-2 h_i}) z_i,       z_i ~ N(0, I),
        the noise's variance the integral of the injected noise over the step; with D_i = x_theta it is DDPM's
        ancestral step (DDIM with eta = 1). Each step draws exactly one z_i = torch.randn_like(x) after its network
        call, as the DDPM sampler does: the last one too (which the step to sigma = 0 multiplies by 0).
        """
        if device is None:
            device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else "cpu"
        x = noise if noise is not None else torch.randn(*shape, device=device)
        timesteps = self.dpm_solver_timesteps(steps)
        alpha, sigma = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        lam = np.log(alpha / sigma)                                  # lambda_t at every original step t
        x0_prev = None
        for i in tqdm(range(steps), desc="sampling", leave=False) if progress else range(steps):
            s = int(timesteps[i])                                    # the paper's t_{i-1}: where x is now
            t = torch.full((shape[0],), s, device=x.device)
            with torch.no_grad():
                eps = self.call_model(model, x, t, model_kwargs).split(x.shape[1], dim=1)[0]
            x0 = self.predict_xstart_from_eps(x, t, eps)             # x_theta(x_s, s)
            z = (randn_like or torch.randn_like)(x) if sde else None  # z_i: one draw per step, as DDPM's
            if i == steps - 1:
                return x0                                            # the step to sigma = 0
            u = int(timesteps[i + 1])                                # the paper's t_i: where the step lands
            h = lam[u] - lam[s]
            if x0_prev is None:
                D = x0
            else:
                r = (lam[s] - lam[int(timesteps[i - 1])]) / h
                c = float(1 / (2 * r))
                D = (1 + c) * x0 - c * x0_prev
            if sde:   # 1 - e^{-2h} as -expm1(-2h): no cancellation where h is small
                x = (float(sigma[u] / sigma[s] * np.exp(-h)) * x - float(alpha[u] * np.expm1(-2 * h)) * D
                     + float(sigma[u] * np.sqrt(-np.expm1(-2 * h))) * z)
            else:
                x = float(sigma[u] / sigma[s]) * x - float(alpha[u] * np.expm1(-h)) * D
            x0_prev = x0

    def _loop(self, step, model, shape, noise, model_kwargs, progress, device, randn_like):
        if device is None:
            device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else "cpu"
        x = noise if noise is not None else torch.randn(*shape, device=device)
        steps = range(self.num_timesteps)[::-1]
        for i in tqdm(steps, desc="sampling", leave=False) if progress else steps:
            t = torch.tensor([i] * shape[0], device=x.device)
            with torch.no_grad():
                x = step(model, x, t, model_kwargs, randn_like)
        return x


def create_diffusion(timestep_respacing="", *, learn_sigma=True, diffusion_steps=TRAINED_STEPS):
    """The diffusion of DiT on its linear schedule (the only one DiT uses): `timestep_respacing` "" (all 1000 steps,
    training), "250", "ddim50", "25,10". Respaced, beta = 1 - abar_t / abar_(kept step before): abar is kept."""
    # DDPM's 1e-4 ... 0.02 over 1000 steps, rescaled so other step counts span the same range
    scale = 1000 / diffusion_steps
    betas = np.linspace(scale * 0.0001, scale * 0.02, diffusion_steps, dtype=np.float64)
    kept = sorted(space_timesteps(diffusion_steps, timestep_respacing or str(diffusion_steps)))
    abar = np.cumprod(1.0 - betas)[kept]                      # (K,): abar at the kept steps
    new_betas = 1 - abar / np.append(1.0, abar[:-1])
    return GaussianDiffusion(new_betas, learn_sigma=learn_sigma, timestep_map=np.array(kept))
