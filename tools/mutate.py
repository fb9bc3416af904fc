"""Mutation check of the test suite: does it notice a one-line bug?

    python tools/mutate.py                  # every mutation; prints: mutation, caught by which tests (~20-30 min, 2 cores)
    python tools/mutate.py --only ddim vae  # the mutations whose name contains one of these words
    python tools/mutate.py --list           # the mutations, nothing run

Each mutation replaces one exact snippet of one file in a scratch copy of the repository, runs the tests that
specify that behaviour (a `pytest -k` expression) and reports which of them failed. A mutation that no test
catches is a hole in the suite; a mutation whose snippet is no longer in the code is STALE (the code moved:
update its snippet). Exit code 0 only when every mutation applies and is caught. Not run in CI.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository

# Selections of tests: the pins to independent implementations, and the closed-form answers.
REFERENCE = "official or diffusers or pytorch_fid or lpips_package or authors"
CLOSED = ("optimal_eps or output_variance or linspace or q_posterior or cos_then_sin or sincos or pos_embed "
          "or closed_form or scatter or center_crop or q_sample or second_order")
NUMERIC = f"{REFERENCE} or {CLOSED}"

TIERS = "tiers or genus or rank or tier_probs"

# (name, file, snippet, replacement, pytest -k expression of the tests that specify the behaviour)
MUTATIONS = [
    # --- named in the issue -------------------------------------------------------------------------------
    ("training ignores `train` (no substitution)", "model.py",
     "        if train:\n            y = self.substitute(y)", "        if False:\n            y = self.substitute(y)",
     "swaps_labels or substitution"),
    ("--superclass-prob forced to 0", "train.py",
     "hierarchy=dataset.hierarchy(), superclass_prob=args.superclass_prob,",
     "hierarchy=dataset.hierarchy(), superclass_prob=0.0,", "swaps_labels"),
    ("MSE target is x0, not eps", "diffusion.py",
     "mse = mean_flat((noise - model_output) ** 2)", "mse = mean_flat((x_start - model_output) ** 2)",
     NUMERIC + " or training_loss"),
    ("training latents without the 0.18215 scale", "vae.py",
     "return scale * (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))",
     "return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)", "0_18215"),
    ("sample.py swaps the conditional and guide halves", "sample.py",
     "kwargs = dict(y=torch.cat([y, torch.as_tensor(guide, device=device)]),",
     "kwargs = dict(y=torch.cat([torch.as_tensor(guide, device=device), y]),", REFERENCE),
    ("sample.py guides all 4 channels by default", "sample.py",
     "guide_channels=None if guide_all_channels else 3)", "guide_channels=None)", REFERENCE),
    ("DDPM noise scaled by the variance, not the std", "diffusion.py",
     "nonzero * torch.exp(0.5 * out[\"log_variance\"]) * noise", "nonzero * torch.exp(out[\"log_variance\"]) * noise",
     NUMERIC),
    ("learned-range interpolation reversed", "diffusion.py",
     "log_variance = frac * max_log + (1 - frac) * min_log", "log_variance = frac * min_log + (1 - frac) * max_log",
     NUMERIC),
    ("DDIM mean uses abar_t where abar_{t-1} belongs", "diffusion.py",
     "return out[\"pred_xstart\"] * torch.sqrt(abar_prev)", "return out[\"pred_xstart\"] * torch.sqrt(gather(self.alphas_cumprod, t, x.shape))",
     NUMERIC),
    ("timestep embedding: sine and cosine swapped", "model.py",
     "emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
     "emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)", NUMERIC),
    ("FID: sqrtm of each covariance instead of the product", "fid_inception.py",
     "covmean = _sqrtm(sigma1.dot(sigma2))", "covmean = _sqrtm(sigma1).dot(_sqrtm(sigma2))",
     "frechet or fid"),
    ("FID: no singular fallback", "fid_inception.py",
     "    if not np.isfinite(covmean).all():", "    if False:", "frechet or fid"),
    ("Inception: no [-1, 1] rescale", "fid_inception.py",
     "        x = 2 * x - 1  # the TF graph expects [-1, 1]", "", "inception"),
    ("Inception: Mixed_7c average-pools", "fid_inception.py",
     "self.Mixed_7c = FIDInceptionE(2048, pool=\"max\")", "self.Mixed_7c = FIDInceptionE(2048, pool=\"avg\")",
     "inception"),
    ("DiT-L has 12 heads", "model.py",
     "\"L\": (24, 1024, 16)", "\"L\": (24, 1024, 8)", "configurations"),
    ("a DiffFit gate is created but never used", "model.py",
     "        if hasattr(self, \"gamma1\"):\n            attn = self.gamma1 * attn\n", "", "difffit"),
    ("VAE logvar clamp missing", "vae.py",
     "return mean, logvar.clamp(-30.0, 20.0)", "return mean, logvar", "vae"),
    ("safetensors F32 tag renamed", "hardening.py",
     "\"F32\": (\"<f4\", torch.float32)", "\"FP32\": (\"<f4\", torch.float32)", "safetensors or " + REFERENCE),
    ("iNat21 Mollusks range off by one", "model.py",
     "(5219, 5387, \"Mollusks\")", "(5219, 5386, \"Mollusks\")", "inat21"),
    ("EMA decay and 1 - decay swapped", "train.py",
     "ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)", "ema[name].mul_(1 - decay).add_(p.detach(), alpha=decay)",
     "ema"),
    ("sample.py decodes without dividing by 0.18215", "sample.py",
     "decode(x / vae.scaling_factor)", "decode(x)", REFERENCE),
    ("VAE attention residual dropped", "vae.py",
     "        return x + h                                                      # residual, rescale factor 1",
     "        return h", "vae"),
    ("Table 1 pairs superclasses by index", "evaluate.py",
     "            s = fake_names.index(name) if name in fake_names else None\n", "            s = r\n", "fid_table"),
    ("centre crop takes the top-left corner", "data.py",
     "crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2", "crop_y, crop_x = 0, 0",
     "crop"),
    ("LPIPS drops its unit normalisation", "evaluate.py",
     "f = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)", "f = h", "lpips"),
    ("schedule squared-linear with the same end points", "diffusion.py",
     "betas = np.linspace(scale * 0.0001, scale * 0.02, diffusion_steps, dtype=np.float64)",
     "betas = np.linspace((scale * 0.0001) ** 0.5, (scale * 0.02) ** 0.5, diffusion_steps, dtype=np.float64) ** 2",
     NUMERIC),
    # --- our own: model.py -------------------------------------------------------------------------------
    ("adaLN modulate without the 1 +", "model.py",
     "return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)", "return x * scale.unsqueeze(1) + shift.unsqueeze(1)",
     REFERENCE),
    ("final layer: shift and scale swapped", "model.py",
     "        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)",
     "        scale, shift = self.adaLN_modulation(c).chunk(2, dim=1)", REFERENCE),
    ("unpatchify transposes each patch", "model.py",
     "x = torch.einsum(\"nhwpqc->nchpwq\", x)", "x = torch.einsum(\"nhwpqc->nchqwp\", x)", REFERENCE),
    ("superclass rows without the offset K", "model.py",
     "return self.tier_start[rank] + self.node_of[self.ranks.index(rank)][y]",
     "return self.node_of[self.ranks.index(rank)][y]",
     "superclass or " + REFERENCE),
    ("2-D positions: sin and cos swapped", "model.py",
     "return np.concatenate([np.sin(out), np.cos(out)], axis=1)     # (M, D)",
     "return np.concatenate([np.cos(out), np.sin(out)], axis=1)     # (M, D)", NUMERIC),
    ("FineDiffusion does not train the LayerNorm affine", "model.py",
     "\"finediffusion\": table or bias or norm}", "\"finediffusion\": table or bias}", "table2 or trainable"),
    # --- diffusion.py --------------------------------------------------------------------------------------
    ("respaced sampler calls the model with respaced indices", "diffusion.py",
     "return model(x, t_orig, **(model_kwargs or {}))", "return model(x, t, **(model_kwargs or {}))",
     "respac or " + NUMERIC),
    ("x0 from eps with the wrong sign", "diffusion.py",
     "- gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps",
     "+ gather(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps", NUMERIC),
    ("posterior mean uses alpha instead of sqrt(alpha)", "diffusion.py",
     "(1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)",
     "(1.0 - self.alphas_cumprod_prev) * alphas / (1.0 - self.alphas_cumprod)", NUMERIC),
    ("VB: decoder NLL and KL swapped at t = 0", "diffusion.py",
     "return torch.where(t == 0, nll, kl)", "return torch.where(t == 0, kl, nll)", NUMERIC + " or training_loss"),
    ("respacing forgets the skipped steps' noise", "diffusion.py",
     "new_betas = 1 - abar / np.append(1.0, abar[:-1])", "new_betas = betas[kept]",
     "respac or " + NUMERIC),
    ("DPM-Solver++: lambda with the wrong sign", "diffusion.py",
     "lam = np.log(alpha / sigma)", "lam = np.log(sigma / alpha)", "dpm_solver or " + NUMERIC),
    ("DPM-Solver++(2M): correction 1/r where 1/(2r) belongs", "diffusion.py",
     "c = float(1 / (2 * r))", "c = float(1 / r)", "dpm_solver or " + NUMERIC),
    ("DPM-Solver++: first order at every step (DDIM)", "diffusion.py",
     "            if x0_prev is None:\n", "            if True:\n", "dpm_solver or " + NUMERIC),
    ("DPM-Solver++(2M): r = h_i / h_{i-1} inverted", "diffusion.py",
     "r = (lam[s] - lam[int(timesteps[i - 1])]) / h", "r = h / (lam[s] - lam[int(timesteps[i - 1])])",
     "dpm_solver or " + NUMERIC),
    ("DPM-Solver++: sigma ratio taken from the alphas", "diffusion.py",
     "float(sigma[u] / sigma[s]) * x", "float(alpha[u] / alpha[s]) * x", "dpm_solver or " + NUMERIC),
    ("DPM-Solver++: stops at its last timestep, not at sigma 0", "diffusion.py",
     "                return x0                                            # the step to sigma = 0",
     "                return x", "dpm_solver or " + NUMERIC),
    ("DPM-Solver++ timesteps truncated, not rounded", "diffusion.py",
     "np.linspace(0, self.num_timesteps - 1, steps + 1).round()[::-1]", "np.linspace(0, self.num_timesteps - 1, steps + 1)[::-1]",
     "dpm_solver or " + NUMERIC),
    # DPM-Solver++(2M) SDE (issue 21): its update, its noise, and the pieces it shares with the ODE solver, caught
    # by its own tests alone ("dpm_solver_sde": the diffusers pins, the Gaussian marginals, the draw count)
    ("DPM-Solver++ SDE: the noise term dropped", "diffusion.py",
     "+ float(sigma[u] * np.sqrt(-np.expm1(-2 * h))) * z)", "+ 0 * z)", "dpm_solver_sde or " + NUMERIC),
    ("DPM-Solver++ SDE: noise coefficient sqrt(1 - e^{-h}), the ODE's exponent", "diffusion.py",
     "float(sigma[u] * np.sqrt(-np.expm1(-2 * h))) * z", "float(sigma[u] * np.sqrt(-np.expm1(-h))) * z",
     "dpm_solver_sde or " + NUMERIC),
    ("DPM-Solver++ SDE: noise scaled by sigma_s, not sigma_t", "diffusion.py",
     "float(sigma[u] * np.sqrt(-np.expm1(-2 * h))) * z", "float(sigma[s] * np.sqrt(-np.expm1(-2 * h))) * z",
     "dpm_solver_sde or " + NUMERIC),
    ("DPM-Solver++ SDE: x_s kept with the ODE's sigma ratio (no e^{-h})", "diffusion.py",
     "float(sigma[u] / sigma[s] * np.exp(-h)) * x", "float(sigma[u] / sigma[s]) * x", "dpm_solver_sde or " + NUMERIC),
    ("DPM-Solver++ SDE: wrong sign of h in the data term", "diffusion.py",
     "float(alpha[u] * np.expm1(-2 * h)) * D", "float(alpha[u] * np.expm1(2 * h)) * D", "dpm_solver_sde or " + NUMERIC),
    ("DPM-Solver++ SDE: wrong sign of h in the decay of x_s", "diffusion.py",
     "float(sigma[u] / sigma[s] * np.exp(-h)) * x", "float(sigma[u] / sigma[s] * np.exp(h)) * x",
     "dpm_solver_sde or " + NUMERIC),
    ("DPM-Solver++ SDE: first order at every step (SDE tests alone)", "diffusion.py",
     "            if x0_prev is None:\n", "            if True:\n", "dpm_solver_sde"),
    ("DPM-Solver++ SDE: 1/r where 1/(2r) belongs (SDE tests alone)", "diffusion.py",
     "c = float(1 / (2 * r))", "c = float(1 / r)", "dpm_solver_sde"),
    ("DPM-Solver++ SDE: no draw at the last step", "diffusion.py",
     "z = (randn_like or torch.randn_like)(x) if sde else None",
     "z = (randn_like or torch.randn_like)(x) if sde and i < steps - 1 else None",
     "dpm_solver_sde"),
    ("--sampler dpm++2m-sde runs the ODE solver", "sample.py",
     "sde=self.kind == \"dpm++2m-sde\"", "sde=False", "dpm_solver_sde or sampler"),
    # --- data.py -------------------------------------------------------------------------------------------
    ("images scaled to [0, 1], not [-1, 1]", "data.py",
     "    return (x - 0.5) / 0.5\n", "    return x\n", "minus_one"),
    ("latent cache: mirror stored as the original", "data.py",
     "mean, logvar = vae.encode(torch.cat([x, x.flip(-1)]))", "mean, logvar = vae.encode(torch.cat([x, x]))",
     "cache"),
    ("toy: the tint ignored", "toy.py",
     "sat = 0.35 + 0.6 * tint + 0.08 * (u[:, 4] - 0.5)", "sat = 0.35 + 0.08 * (u[:, 4] - 0.5)", "pale"),
    # --- train.py ------------------------------------------------------------------------------------------
    ("the optimizer steps on cleared gradients", "train.py",
     "    scaler.step(opt)\n    scaler.update()\n", "    opt.zero_grad()\n    scaler.step(opt)\n    scaler.update()\n",
     "loss_falls or resume or ema"),
    ("delta checkpoints store every tensor", "train.py",
     "model = {name: state[name] for name, _ in run.tuned} if run.base else state",
     "model = state", "checkpoint"),
    ("training timesteps never reach t = 999", "train.py",
     "t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)",
     "t = torch.randint(0, diffusion.num_timesteps // 2, (x.shape[0],), device=x.device)", "timesteps"),
    # --- sample.py -----------------------------------------------------------------------------------------
    ("sample.py ignores the seed", "sample.py",
     "        torch.manual_seed(seed)\n", "        pass\n", "sample or reproduc"),
    ("sample.py: null guide where superclass was asked", "sample.py",
     "    if guidance == \"null\":\n        return torch.full_like(y, emb.null_id)",
     "    if guidance in (\"null\", \"superclass\"):\n        return torch.full_like(y, emb.null_id)",
     "sample or " + REFERENCE),
    ("guidance interval excludes its bounds", "sample.py",
     "if lo <= int(t[0]) <= hi:", "if lo < int(t[0]) < hi:", "interval"),
    ("outside the guidance interval the DiT still runs on the whole batch", "sample.py",
     "out = model.forward(x[:n], t[:n], y[:n])", "out = model.forward(x, t, y)[:n]", "interval"),
    ("outside the guidance interval the guide half's labels", "sample.py",
     "out = model.forward(x[:n], t[:n], y[:n])", "out = model.forward(x[:n], t[:n], y[n:])", "interval"),
    ("the guidance interval is ignored", "sample.py",
     "net = model.forward_with_cfg if sampler.interval is None else interval_guidance(model, *sampler.interval)",
     "net = model.forward_with_cfg", "interval"),
    # --- wiring: from the file to the DiT, and what a run says it used ------------------------------------
    ("load_model drops a published file's hierarchy", "model.py",
     "model = DiT_models[config[\"name\"]](**kwargs, hierarchy=hierarchy)",
     "model = DiT_models[config[\"name\"]](**kwargs)", "authors_file or superclass_range"),
    ("load_model drops our checkpoint's hierarchy", "model.py",
     "    model = build_model(**config, hierarchy=hierarchy)\n    if ckpt", "    model = build_model(**config)\n    if ckpt",
     "our_delta"),
    ("the console names the intended guide row, not the used one", "sample.py",
     "describe_guide(model, int(guide[0]))",
     "describe_guide(model, model.y_embedder.num_classes + hierarchy['superclass_of'][cls])", "console_names"),
    ("sample.py loses the VAE on its way to decode", "sample.py",
     "args.cfg_scale, sampler, vae, args.seed, args.device", "args.cfg_scale, sampler, None, args.seed, args.device",
     "sample_script or authors_pixels or authors_file"),
    ("generate loses the VAE on its way to decode", "evaluate.py",
     "args.cfg_scale, sampler, vae, seeds, device", "args.cfg_scale, sampler, None, seeds, device",
     "generate_decodes"),
    ("generate hashes the path given, not the file read", "evaluate.py",
     "ckpt_sha256=file_sha256(info[\"path\"])", "ckpt_sha256=file_sha256(args.ckpt)", "generate"),
    ("a resume forgets a saved argument", "train.py",
     "NOT_RESUMED = {\"resume\", \"export\", \"run_dir\", \"init\", \"given\"}",
     "NOT_RESUMED = {\"resume\", \"export\", \"run_dir\", \"init\", \"given\", \"superclass_prob\"}", "resume"),
    # --- evaluate.py ---------------------------------------------------------------------------------------
    ("feature covariance biased", "fid_inception.py",
     "return features.mean(axis=0), np.cov(features, rowvar=False)",
     "return features.mean(axis=0), np.cov(features, rowvar=False, bias=True)", "feature_stats or fid"),
    ("TF pooling counts the padding", "fid_inception.py",
     "return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)",
     "return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)", "inception"),
    ("FID drops trace(sigma2)", "fid_inception.py",
     "np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)", "np.trace(sigma1) - 2 * np.trace(covmean)",
     "frechet or fid"),
    ("LPIPS pairs may pair an image with itself", "sample.py",
     "    other = other + (other >= rank)\n", "", "lpips"),
    ("toy: every seed samples the same noise", "toy.py",
     "key[1], sampler, seed=seed,", "key[1], sampler, seed=args.seed,", "toy"),
    # --- bench.py ------------------------------------------------------------------------------------------
    ("bench: a guided step costs one DiT evaluation per image", "bench.py",
     "evaluations_per_image=2 * inside + (steps - inside)", "evaluations_per_image=inside + (steps - inside)", "bench"),
    ("gpu-check: the DiT paper's multiply-adds taken for FLOPs", "tools/gpu_check.py",
     "XL2_FORWARD_FLOPS = 2 * 118.6e9", "XL2_FORWARD_FLOPS = 118.6e9", "gpu_check_counts"),
    ("gpu-check: FineDiffusion's backward counted as full's", "tools/gpu_check.py",
     "BACKWARD_PER_FORWARD = {\"full\": 2, \"finediffusion\": 1}",
     "BACKWARD_PER_FORWARD = {\"full\": 2, \"finediffusion\": 2}", "gpu_check_counts"),
    ("gpu-check: an L40S taken for an L4", "tools/gpu_check.py",
     "re.search(rf\"\\b{re.escape(name)}\\b\", gpu or \"\")", "re.search(re.escape(name), gpu or \"\")", "gpu_check_takes"),
    # (not the CPU rehearsal: a CPU never raises OutOfMemoryError, so that search would double without end)
    ("gpu-check: the batch search passes its cap", "tools/gpu_check.py",
     "while 2 * batch <= most and fit(2 * batch):", "while fit(2 * batch):", "gpu_check_batch"),
    ("gpu-check: any error counts as out of memory", "tools/gpu_check.py",
     "    except torch.OutOfMemoryError:\n        pass", "    except RuntimeError:\n        pass", "gpu_check_batch"),
    ("gpu-check: the DDP smoke test without DDP", "bench.py",
     "if world > 1 else model\n", "if False else model\n", "gpu_check_rehearsed"),
    ("gpu-check: a NaN loss passes", "bench.py",
     "        raise RunFailed(f\"loss is {losses[bad]} at step {bad + 1} of {len(losses)}\")", "        pass",
     "gpu_check_fails"),
    ("gpu-check: a worker out of time killed, so torchrun's ranks live on", "bench.py",
     "            proc.terminate()", "            proc.kill()", "worker_past"),
    # --- figures and the regime toy (issue 12) --------------------------------------------------------------
    ("t-SNE: Gaussian Q instead of Student-t", "figures.py",
     "num = 1 / (1 + squared_distances(y))", "num = torch.exp(-squared_distances(y))", "tsne"),
    ("t-SNE: P left unsymmetrised", "figures.py",
     "return (p + p.T) / (2 * len(p))", "return p / len(p)", "tsne"),
    ("t-SNE: bisection moves beta the wrong way", "figures.py",
     "too_flat = entropy > target", "too_flat = entropy < target", "tsne"),
    ("t-SNE: climbs the gradient", "figures.py",
     "update = momentum * update - lr * gains * grad", "update = momentum * update + lr * gains * grad", "tsne"),
    ("nearest neighbours include the point itself", "figures.py",
     "        d[torch.arange(len(d)), torch.arange(start, start + len(d))] = math.inf\n", "", "same_superclass"),
    ("Fig. 7: superclass rows from the config, not the table", "figures.py",
     "K, S, start = embedder.num_classes, embedder.num_superclasses, embedder.tier_start.get(\"superclass\")",
     "K, S, start = (ckpt[\"config\"][k] for k in (\"num_classes\", \"num_superclasses\", \"num_classes\"))",
     "embeddings"),
    ("Fig. 5 draws each row from another seed", "figures.py",
     "guide, args.cfg_scale, sampler, vae, args.seed, args.device,",
     "guide, args.cfg_scale, sampler, vae, args.seed + len(cells), args.device,", "grid"),
    ("training log keeps the steps a resume repeats", "figures.py",
     "        while records and records[-1][\"step\"] >= r[\"step\"]:\n            records.pop()\n", "", "read_log"),
    ("training time restarts at every resume", "train.py",
     "run.time_before, run.last_ckpt = ckpt[\"time_s\"], run.args.resume",
     "run.time_before, run.last_ckpt = 0.0, run.args.resume", "training_time"),
    ("the fine-grained toy images change with the training seed", "toy.py",
     "images_per_class=50, seed=0)", "images_per_class=50)", "fixed_set"),
    ("a changed shipped toy base is fine-tuned from", "hardening.py",
     "file_sha256(path) != sha256", "False", "changed_toy_base"),
    ("--data toy takes the paper's recipe", "train.py",
     "for flag, value in RECIPES.get(args.data, RECIPES[\"paper\"]).items():", "for flag, value in RECIPES[\"paper\"].items():",
     "no_other_flags"),
    # --- results that say what made them; nothing broken written as an image -------------------------------
    ("fid compares statistics of images of another size", "hardening.py",
     "    if real[\"image_size\"] != fake[\"image_size\"]:\n", "    if False:\n",
     "refuse_statistics or refuses_statistics"),
    ("fid compares statistics of another Inception network", "hardening.py",
     "    if real[\"inception_sha256\"] != fake[\"inception_sha256\"]:\n", "    if False:\n", "refuses_statistics"),
    ("a Table 1 row for a superclass whose classes differ", "evaluate.py",
     "            if members(real_h, r) != members(fake_h, s):\n", "            if False:\n", "classes_differ"),
    ("the VAE decodes under the DiT's fp16 autocast", "sample.py",
     "        x = guard.check_samples(vae.to(device).decode(x / vae.scaling_factor).float(), y, "
     "\"once decoded by the VAE\")\n",
     "        with low_precision:\n            x = guard.check_samples(vae.to(device).decode(x / vae.scaling_factor)"
     ".float(), y, \"once decoded by the VAE\")\n",
     "overflows_fp16"),
    ("a sample that is not finite is written as an image", "hardening.py",
     "    if bad.any():\n", "    if False:\n", "non_finite_stops"),
    ("training latents scaled by 0.18215 whatever the VAE", "train.py",
     "scaled_latent(*vae.encode(x), vae.scaling_factor)", "scaled_latent(*vae.encode(x), 0.18215)",
     "latent_run or 0_18215"),
    ("samples decoded by 0.18215 whatever the VAE", "sample.py",
     "decode(x / vae.scaling_factor)", "decode(x / 0.18215)", "latent_run"),
    ("a VAE of another latent scale decodes a DiT", "hardening.py",
     "    if decoder.scaling_factor != trained_scale:\n", "    if False:\n", "latent_scale_is"),
    ("LPIPS runs on images too small for AlexNet", "evaluate.py",
     "    elif min(source.made[\"image_size\"]) < LPIPS_MIN_SIZE:", "    elif False:", "too_small"),
    ("FID reported below zero", "evaluate.py", "max(0.0, fid)", "fid", "never_below"),
    ("a Table 1 image seeded by its batch", "evaluate.py",
     "            seeds = [image_seed(args.seed, c, i) for c, i in batches[j]]",
     "            seeds = args.seed + j", "depends_on_its"),
    ("per-image noise drawn from the first image's stream", "sample.py",
     "torch.randn(x.shape[1:], generator=g, device=x.device) for g in self.generators",
     "torch.randn(x.shape[1:], generator=self.generators[0], device=x.device) for g in self.generators",
     "depends_on_its"),
    ("generate running out of memory is a traceback", "evaluate.py",
     "    with out_of_memory_advice(f\"--batch-size {max(1, args.batch_size // 2)}\", kept):",
     "    if True:", "out_of_memory_names"),
    ("--local-rank refused", "hardening.py",
     "        self.add_argument(\"--local-rank\", \"--local_rank\", dest=\"local_rank\", type=int, help=argparse.SUPPRESS)\n",
     "", "local_rank"),
    ("JSON read in the locale's encoding", "hardening.py",
     "        with open(path, encoding=\"utf-8\") as f:\n            return json.load(f)",
     "        with open(path) as f:\n            return json.load(f)", "ascii_locale"),
    ("an .npz image reader that does not pickle", "evaluate.py",
     "CroppedImages(images, image_size) if image_size else images,", "CroppedImages(images, image_size) if "
     "image_size else (lambda i: images(i)),", "spawn"),
    ("Inception: features of Mixed_7b (Mixed_7c skipped)", "fid_inception.py",
     "x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))", "x = self.Mixed_7b(self.Mixed_7a(x))", "inception"),
    ("Inception: nearest-neighbour resize to 299", "fid_inception.py",
     "mode=\"bilinear\", align_corners=False", "mode=\"nearest\"", "inception"),
    ("statistics: a batch's features out of step with its labels", "evaluate.py",
     "                yield x, y  # (B, 3, H, W), (B,)", "                yield x.flip(0), y", "each_image_read"),
    # --- what the data path hands the DiT, across ranks -----------------------------------------------------
    ("every rank trains on rank 0's share", "train.py",
     "DistributedSampler(dataset, num_replicas=world, rank=run.rank,", "DistributedSampler(dataset, num_replicas=world, "
     "rank=0,", "reaches_the_dit"),
    ("training images never flipped", "train.py",
     "args.data, args.data_path, args.image_size, args.split, flip=True, seed=args.seed,",
     "args.data, args.data_path, args.image_size, args.split, flip=False, seed=args.seed,", "reaches_the_dit"),
    ("the cached mirror never drawn", "data.py",
     "view = int(torch.randint(2, ())) if self.flip else 0", "view = 0", "reaches_the_dit"),
    ("an item's flip the same every epoch", "train.py",
     "((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + i)", "((self.seed * 1_000_003) * 1_000_000_007 + i)",
     "reaches_the_dit"),
    # --- pre-emption as schedulers send it, names that are not patterns, loaded state checked --------------------
    ("DataLoader workers die of the group's stop signal", "hardening.py",
     "    for s in STOP_SIGNALS:\n        signal.signal(s, signal.SIG_IGN)\n", "", "whole_process_group"),
    ("Ctrl-C is not a stop request", "hardening.py",
     "STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)", "STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)",
     "whole_process_group"),
    ("the workers are still running while the stop is saved", "train.py",
     "                    if last:\n                        stream.close()", "                    if False:\n"
     "                        stream.close()", "while_it_saves"),
    ("the stop re-read after the ranks agreed", "train.py", "                    if stopping:\n                        raise Stopped(",
     "                    if stop.signal:\n                        raise Stopped(", "just_after_the_ranks_agreed"),
    ("forked workers keep the run's lock", "hardening.py",
     "    for lock in LOCKS:\n        lock.close()\n", "", "sigkill"),
    ("a run folder's name taken as a pattern", "hardening.py",
     "os.path.join(glob.escape(folder), \"**\"", "os.path.join(folder, \"**\"", "pattern or brackets"),
    ("a new run into a folder named like a pattern is not refused", "hardening.py",
     "glob.glob(os.path.join(glob.escape(run_dir), \"checkpoints\", \"*.pt\"))",
     "glob.glob(os.path.join(run_dir, \"checkpoints\", \"*.pt\"))", "pattern"),
    ("samples.json names checked as written, not as resolved", "hardening.py",
     "not is_inside(folder, os.path.join(folder, name)):", "os.path.isabs(name) or name.startswith(\"..\"):",
     "linked_out"),
    ("generate takes no lock on its folder", "evaluate.py",
     "        held.append(lock_folder(args.out, \"another evaluate.py generate\", \"wait for it to end, or choose "
     "another --out\"))\n", "        held.append(None)\n", "in_use_is_refused"),
    ("a resume keeps an image whatever drew it", "evaluate.py",
     "if not all(made_under(os.path.join(args.out, job_file(c, i)), tag) for c, i in batches[j])]",
     "if not all(os.path.isfile(os.path.join(args.out, job_file(c, i))) for c, i in batches[j])]", "in_use_is_refused"),
    ("a checkpoint loaded without its config's check", "model.py",
     "    else:\n        load_strict(model, tensors, path)", "    else:\n        load_pretrained(model, tensors)",
     "damaged_or_hostile"),
    ("a delta loaded without the checks", "model.py",
     "        load_strict(model, tensors, path, expected=tuned)", "        model.load_state_dict(tensors, strict=False)",
     "damaged_or_hostile"),
    ("a non-finite weight loaded", "hardening.py",
     "        if tensor.is_floating_point() and not torch.isfinite(tensor).all():", "        if False:",
     "damaged_or_hostile"),
    ("a compressed checkpoint record inflated", "hardening.py", "            if packed:", "            if False:",
     "damaged_or_hostile"),
    ("VAE config fields taken unchecked", "hardening.py", "        if not VAE_FIELDS[key][0](value):",
     "        if False:", "damaged_or_hostile"),
    ("iNat21 categories taken unchecked", "hardening.py",
     "        if not (isinstance(c, dict) and isinstance(c.get(\"id\"), int)", "        if False and (isinstance(c, dict) "
     "and isinstance(c.get(\"id\"), int)", "damaged_or_hostile"),
    ("statistics counts taken unchecked", "hardening.py",
     "        if name.startswith(\"count\") and", "        if False and", "damaged_or_hostile"),
    ("an empty cache array is a traceback", "hardening.py", "except (OSError, ValueError, EOFError) as e:",
     "except (OSError, ValueError) as e:", "damaged_or_hostile"),
    # --- tiers beyond the superclass (issue 32) ----------------------------------------------------------------
    ("every tier's rows start at K", "model.py",
     "self.tier_start = {rank: int(start) for rank, start in zip(self.tier_sizes, starts)}",
     "self.tier_start = {rank: num_classes for rank in self.tier_sizes}", TIERS),
    ("substitution ignores --tier-probs", "model.py",
     "probs = torch.tensor(self.tier_probs or [1.0] * len(up), device=y.device)",
     "probs = torch.tensor([1.0] * len(up), device=y.device)", "substitut or " + TIERS),
    ("substitution always takes the first tier", "model.py",
     "up = up.gather(0, torch.multinomial(probs, y.shape[0], replacement=True)[None])", "up = up[:1]",
     "substitut or " + TIERS),
    ("train.py drops --tier-probs", "train.py", "                        tier_probs=args.tier_probs)",
     "                        tier_probs=None)", TIERS),
    ("train.py drops --tiers", "train.py",
     "tiers = {} if args.tiers in (None, [\"superclass\"]) else dict(tiers=args.tiers)", "tiers = {}", TIERS),
    ("--guidance genus guides from the superclass rows", "sample.py",
     "return emb.tier_ids(y.to(emb.node_of.device), guidance).cpu()",
     "return emb.tier_ids(y.to(emb.node_of.device), \"superclass\").cpu()", "guid or " + TIERS),
    ("the console names every guide row a superclass", "sample.py",
     "return f\"{rank} row {row} ({emb.node_names[rank][row - emb.tier_start[rank]]})\"",
     "return f\"superclass row {row} ({emb.node_names['superclass'][row - emb.tier_start['superclass']]})\"",
     "guide or " + TIERS),
    ("iNat21's genus and family swapped", "hardening.py",
     "INAT21_RANKS = (\"genus\", \"family\",", "INAT21_RANKS = (\"family\", \"genus\",", "inat21 or " + TIERS),
    ("a CSV's rank columns read in reverse", "data.py",
     "ranks = ranks_between(between, [nodes[c] for c in class_names])",
     "ranks = ranks_between(between[::-1], [nodes[c] for c in class_names])", "csv or " + TIERS),
    ("Fig. 7 counts the superclass at every rank", "figures.py",
     "node = torch.as_tensor(nodes_at(hierarchy, rank)[1])[keep]",
     "node = torch.as_tensor(nodes_at(hierarchy, \"superclass\")[1])[keep]", "embeddings"),
    ("toy: tint accuracy not restricted to the genus", "toy.py",
     "in_genus = logits.masked_fill(genus[None, :] != genus[labels][:, None], -math.inf).argmax(1)",
     "in_genus = logits.argmax(1)", "tint or toy_table"),
    ("a hierarchy's ranks are not checked", "hardening.py",
     "        levels.append((r[\"names\"], r[\"of\"]))", "        pass", "hierarchy or " + TIERS),
    ("a CSV header may name a rank twice or the superclass before the end", "hardening.py",
     "    if len(set(header)) < len(header) or \"superclass\" in header[1:-1]:", "    if False:", "csv_header"),
    ("--tiers silently dropped on a table without tiers", "hardening.py",
     "    if not tiered and tiers != [\"superclass\"]:", "    if False:", "tiers_the_data"),
    ("a blank line before a CSV header makes it a class", "hardening.py",
     "    first = next((row for row in rows if any(row)), None)", "    first = rows[0] if rows else None",
     "blank_lines or csv"),
    ("a resume compares the ranks too (files from before ranks refused)", "train.py",
     "guard.check_same_classes(two_levels(dataset.hierarchy()), two_levels(model.hierarchy), args.resume)",
     "guard.check_same_classes(dataset.hierarchy(), model.hierarchy, args.resume)", "resume or " + TIERS),
    # --- Table 1 at scale: bounded memory, the VegFru file in generate -------------------------------------------
    ("generate drops --data-path (the VegFru file unguidable)", "evaluate.py",
     "load_for_sampling(args.ckpt, args.base, args.vae, data.dataset_root(args.data, args.data_path))",
     "load_for_sampling(args.ckpt, args.base, args.vae)", "vegfru"),
    ("grid reads the lists at --data-path alone, not at --data's default root", "figures.py",
     "    root = data.dataset_root(args.data, args.data_path)", "    root = args.data_path", "vegfru"),
    ("generate and grid do not say which flag tells the VegFru file its superclasses", "sample.py",
     "    guard.check_hierarchy_known(model.hierarchy, emb.tier_sizes, guidance)\n", "", "vegfru"),
    ("a stop signal caught during the ranks' agreement is erased", "hardening.py",
     "        self.signal = int(asked) or self.signal\n        return bool(asked)",
     "        self.signal = int(asked) or None\n        return self.signal is not None", "stop_signal_caught"),
    ("VegFru's lists read for every file", "model.py",
     "        if known is None and kwargs[\"num_superclasses\"] and hierarchy_of_file is not None:",
     "        if hierarchy_of_file is not None:", "data_path_is_read or vegfru"),
    ("features of a left-out image kept (rows past the count)", "fid_inception.py",
     "    return {name: array[:n] for name, array in zip((\"pool\", \"logits\", \"spatial\"), out)}",
     "    return {name: array for name, array in zip((\"pool\", \"logits\", \"spatial\"), out)}",
     "broken_file or unreadable or inception_features"),
    ("the covariance's blocks not centred", "fid_inception.py",
     "    return mu, sum((b - mu).T @ (b - mu) for b in blocks()) / (n - 1)",
     "    return mu, sum(b.T @ b for b in blocks()) / (n - 1)", "feature_stats or frechet"),
]


def scratch_copy():
    """The tracked and untracked (not ignored) files of the repository, in a temporary folder."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=HERE,
                           capture_output=True, text=True, check=True).stdout.split()
    root = tempfile.mkdtemp(prefix="mutate-")
    for name in files:
        if os.path.isfile(os.path.join(HERE, name)):
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            shutil.copy2(os.path.join(HERE, name), os.path.join(root, name))
    return root


def run_tests(root, expression):
    """Names of the failing tests among those selected by `expression` (an error counts as failing)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=no", "-rfE",
                           "test_all.py", "-k", expression], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return re.findall(r"^(?:FAILED|ERROR) test_all\.py::(\S+)", proc.stdout, flags=re.M), proc.returncode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", help="run the mutations whose name contains one of these words")
    p.add_argument("--list", action="store_true", help="list the mutations and stop")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(w.lower() in m[0].lower() for w in args.only)]
    if args.list:
        for name, file, *_ in chosen:
            print(f"{file:<13} {name}")
        return 0
    root = scratch_copy()
    holes = 0
    try:
        print(f"{'mutation':<58} caught by")
        for name, file, snippet, replacement, expression in chosen:
            path = os.path.join(root, file)
            original = open(path).read()
            if original.count(snippet) != 1:
                holes += 1
                print(f"{name:<58} STALE: the snippet occurs {original.count(snippet)} times in {file}", flush=True)
                continue
            with open(path, "w") as f:
                f.write(original.replace(snippet, replacement))
            try:
                failed, code = run_tests(root, expression)
            finally:
                with open(path, "w") as f:
                    f.write(original)
            if not failed:
                holes += 1
            more = f" (+{len(failed) - 2} more)" if len(failed) > 2 else ""
            verdict = ", ".join(failed[:2]) + more if failed else f"NOT CAUGHT (pytest exit {code}; -k {expression!r})"
            if code in (2, 3, 4):                # the mutant did not even import: a broken mutation, not a catch
                failed, verdict = [], f"INVALID: pytest exit {code} (the mutated file does not import?)"
            print(f"{name:<58} {verdict}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{len(chosen) - holes} of {len(chosen)} mutations caught")
    return 1 if holes else 0


if __name__ == "__main__":
    sys.exit(main())
