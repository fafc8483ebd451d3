"""Losses. Each returns a scalar mean over the (optionally masked) batch, in fp32."""
import jax
import jax.numpy as jnp
import optax


def masked_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  if weights is None:
    return jnp.mean(values)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def mae_reconstruction(pred, target, mask, norm_pix: bool = True, eps: float = 1e-6):
  """MAE loss: per-patch MSE on masked patches, target normalised per patch.

  pred/target: [B, N, P]; mask: [B, N] with 1 for masked (predicted) patches.
  """
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  if norm_pix:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + eps)
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def score_regression(pred, target, weights=None, kind: str = 'mse'):
  """Regression loss on the predicted score ('mse', 'l1' or 'huber')."""
  err = pred.astype(jnp.float32) - target.astype(jnp.float32)
  per_example = {'mse': lambda e: e ** 2,
                 'l1': jnp.abs,
                 'huber': lambda e: optax.huber_loss(e, delta=1.0)}[kind](err)
  return masked_mean(per_example, weights)


def distillation_kl(student_logits, teacher_logits, temperature: float, weights=None):
  """T^2 * KL(softmax(t/T) || softmax(s/T)) (Hinton et al. 2015), mean over examples."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return temperature ** 2 * masked_mean(kl, weights)


def feature_distillation(student_tokens, teacher_tokens, weights=None, eps: float = 1e-6):
  """MSE between (projected) student tokens and layer-normalised teacher tokens.

  The teacher's tokens are normalised per token so the target scale does not
  depend on the teacher's residual-stream magnitude (as in MaskedKD / FD).
  """
  t = teacher_tokens.astype(jnp.float32)
  t = (t - t.mean(-1, keepdims=True)) / jnp.sqrt(t.var(-1, keepdims=True) + eps)
  per_example = jnp.mean((student_tokens.astype(jnp.float32) - t) ** 2, axis=(1, 2))
  return masked_mean(per_example, weights)


# Age estimation: ages are integers 0..num_ages-1 (float ages are rounded and
# clipped to that range by the losses that index an age).


def _age_index(ages, num_ages: int) -> jax.Array:
  return jnp.clip(jnp.round(ages.astype(jnp.float32)), 0, num_ages - 1).astype(jnp.int32)


def gaussian_label_distribution(ages, num_ages: int, sigma) -> jax.Array:
  """N(age, sigma^2) discretised over the integer ages 0..num_ages-1: [B, num_ages].

  The density is evaluated at each integer age and renormalised to sum to 1,
  so near the ends of the range the Gaussian is truncated and the cut-off mass
  is spread over the remaining ages proportionally: an age-0 label puts its
  mode on 0 and no mass below it. `sigma` is a scalar or one value per example.
  """
  ages = jnp.asarray(ages, jnp.float32)[..., None]
  sigma = jnp.asarray(sigma, jnp.float32)[..., None]
  k = jnp.arange(num_ages, dtype=jnp.float32)
  return jax.nn.softmax(-0.5 * ((k - ages) / sigma) ** 2, axis=-1)


def label_distribution_kl(logits, values, centers, sigma, weights=None):
  """KL(N(value, sigma^2) discretised over ``centers`` || softmax(logits)) (DLDL).

  Soft targets keep every bin's gradient alive: a softmax regressed through its
  expectation alone can saturate on the bin nearest the label mean and stop learning.
  """
  logits = logits.astype(jnp.float32)
  values = jnp.asarray(values, jnp.float32)[..., None]
  sigma = jnp.asarray(sigma, jnp.float32)[..., None]
  centers = jnp.asarray(centers, jnp.float32)
  # log p via log_softmax: exact even where p underflows to 0 (then p * log p = 0).
  log_p = jax.nn.log_softmax(-0.5 * ((centers - values) / sigma) ** 2, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(logits, axis=-1)), axis=-1)
  return masked_mean(kl, weights)


def age_kl(logits, ages, sigma, weights=None):
  """KL(Gaussian label distribution || softmax(logits)) (DLDL, Gao et al. 2017)."""
  return label_distribution_kl(logits, ages, jnp.arange(logits.shape[-1]), sigma, weights)


def expected_age(logits) -> jax.Array:
  """sum_k k * softmax(logits)_k over the integer ages 0..num_ages-1."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return probs @ jnp.arange(logits.shape[-1], dtype=jnp.float32)


def _log_normal_mass(lo, hi):
  """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails.

  An interval above the mean is mirrored below it, where log_ndtr keeps its
  precision; the difference is then taken in log space.
  """
  mirror = lo > 0
  lo, hi = jnp.where(mirror, -hi, lo), jnp.where(mirror, -lo, hi)
  log_hi = jax.scipy.special.log_ndtr(hi)
  return log_hi + jnp.log(-jnp.expm1(jax.scipy.special.log_ndtr(lo) - log_hi))


def dirac_gaussian_kl(mean, log_sigma, ages, num_ages: int, weights=None,
                      min_sigma: float = 0.1):
  """KL(one-hot(age) || predicted Gaussian discretised over 0..num_ages-1) = -log p(age).

  Integer age k gets the predicted N(mean, sigma^2) mass of [k - 0.5, k + 0.5],
  renormalised by the mass of [-0.5, num_ages - 0.5] (truncation, as in
  `gaussian_label_distribution`). Everything is computed in log space, so a
  prediction far from the label keeps a finite loss and a useful gradient
  instead of log(0). For stability sigma is clipped to [min_sigma, num_ages]:
  a collapsing sigma would make the loss arbitrarily steep.
  """
  k = _age_index(ages, num_ages).astype(jnp.float32)
  return masked_mean(-_gaussian_log_mass(mean, log_sigma, k, num_ages, min_sigma), weights)


def _gaussian_log_mass(mean, log_sigma, k, num_ages: int, min_sigma: float):
  """log p(k) of the truncated, discretised N(mean, sigma^2) of `dirac_gaussian_kl`."""
  mean = mean.astype(jnp.float32)
  sigma = jnp.exp(jnp.clip(log_sigma.astype(jnp.float32),
                           jnp.log(min_sigma), jnp.log(float(num_ages))))
  return (_log_normal_mass((k - 0.5 - mean) / sigma, (k + 0.5 - mean) / sigma)
          - _log_normal_mass((-0.5 - mean) / sigma, (num_ages - 0.5 - mean) / sigma))


def expected_age_gaussian(mean, log_sigma, num_ages: int, min_sigma: float = 0.1):
  """The expectation of the discretised predicted Gaussian over 0..num_ages-1.

  Differs from `mean` when the truncation matters (a mean near an end of the
  range with a wide sigma): the prediction is what the distribution says.
  """
  k = jnp.arange(num_ages, dtype=jnp.float32)
  log_p = _gaussian_log_mass(mean[:, None], log_sigma[:, None], k, num_ages, min_sigma)
  return jnp.exp(log_p) @ k


def age_l1(pred_age, ages, weights=None):
  """Mean absolute error in years (the L1 regression baseline)."""
  return masked_mean(jnp.abs(pred_age.astype(jnp.float32) - ages.astype(jnp.float32)), weights)


def age_cross_entropy(logits, ages, weights=None):
  """Softmax cross-entropy with the (rounded) age as the class: the classification baseline."""
  labels = _age_index(ages, logits.shape[-1])
  return masked_mean(
      optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels), weights)


# Face recognition and its distillation


def _l2_normalize(x, eps: float = 1e-12):
  """x / ||x|| over the last axis; the clamped squared norm keeps zero vectors' gradients finite."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def arcface_logits(cosine, labels, scale: float, margin: float, eps: float = 1e-7):
  """scale * cos(theta + margin) on the target class, scale * cos(theta) elsewhere (ArcFace).

  cosine: [B, C] cosines between normalised embeddings and class centres; labels: [B].
  Where theta + margin > pi, cos(theta + m) would grow again with theta, so, as
  in insightface, the target logit falls back to cos(theta) - m * sin(m).
  """
  cos = jnp.clip(cosine.astype(jnp.float32), -1.0 + eps, 1.0 - eps)
  sin = jnp.sqrt(1.0 - cos * cos)  # > 0 after the clip, so the gradient is finite
  cos_plus_margin = cos * jnp.cos(margin) - sin * jnp.sin(margin)
  target = jnp.where(cos > jnp.cos(jnp.pi - margin), cos_plus_margin,
                     cos - margin * jnp.sin(margin))
  is_target = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
  return scale * jnp.where(is_target, target, cos)


def arcface(cosine, labels, scale: float, margin: float, weights=None):
  """Softmax cross-entropy over the ArcFace logits (Deng et al. 2019)."""
  logits = arcface_logits(cosine, labels, scale, margin)
  return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), weights)


def embedding_distillation(student_emb, teacher_emb, kind: str = 'cosine', weights=None):
  """Pulls the student's embedding direction to the (frozen) teacher's.

  'cosine': 1 - cos(student, teacher); 'l2': squared distance of the
  L2-normalised embeddings (= 2 - 2 cos, twice the gradient).
  """
  s = _l2_normalize(student_emb.astype(jnp.float32))
  t = _l2_normalize(jax.lax.stop_gradient(teacher_emb).astype(jnp.float32))
  if kind == 'cosine':
    per_example = 1.0 - jnp.sum(s * t, axis=-1)
  elif kind == 'l2':
    per_example = jnp.sum((s - t) ** 2, axis=-1)
  else:
    raise ValueError(f"embedding_distillation kind={kind!r}: expected 'cosine' or 'l2'")
  return masked_mean(per_example, weights)


def similarity_distillation(student_emb, teacher_emb):
  """Relational KD: the mean squared difference of the student's and the (frozen) teacher's
  cosine similarities between the batch's examples (off the diagonal).

  What verification reads off an embedding is the cosine between two faces; this term asks
  for those directly, where 1 - cos to each target leaves the errors' directions free.
  """
  s = _l2_normalize(student_emb.astype(jnp.float32))
  t = _l2_normalize(jax.lax.stop_gradient(teacher_emb).astype(jnp.float32))
  n = s.shape[0]
  diff = (s @ s.T - t @ t.T) * (1.0 - jnp.eye(n, dtype=jnp.float32))
  return jnp.sum(diff ** 2) / max(n * (n - 1), 1)


def attention_transfer(student_maps, teacher_maps, weights=None):
  """Attention transfer (Zagoruyko & Komodakis 2017), averaged over map pairs.

  Per pair: each example's map is flattened and L2-normalised, and the loss is
  the squared distance between the student's and the (frozen) teacher's, so
  only where attention is placed matters, not its overall magnitude. A student
  map of another spatial size [B, H, W, ...] is resized (bilinear) to the
  teacher's; maps whose flattened sizes still differ (channel maps of
  different widths) are an error.
  """
  if len(student_maps) != len(teacher_maps) or not teacher_maps:
    raise ValueError(f'attention_transfer needs the same non-zero number of maps, got '
                     f'{len(student_maps)} student and {len(teacher_maps)} teacher maps')
  per_pair = []
  for i, (student, teacher) in enumerate(zip(student_maps, teacher_maps)):
    s = student.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher).astype(jnp.float32)
    if s.ndim >= 3 and t.ndim >= 3 and s.shape[1:3] != t.shape[1:3]:
      s = jax.image.resize(s, s.shape[:1] + t.shape[1:3] + s.shape[3:], method='bilinear')
    if s[0].size != t[0].size:
      raise ValueError(f'attention_transfer pair {i}: student map {tuple(student.shape)} cannot be '
                       f'compared with teacher map {tuple(teacher.shape)}')
    s = _l2_normalize(s.reshape(s.shape[0], -1))
    t = _l2_normalize(t.reshape(t.shape[0], -1))
    per_pair.append(masked_mean(jnp.sum((s - t) ** 2, axis=-1), weights))
  return sum(per_pair) / len(per_pair)


# ----------------------------------------------------------------------------- face priors

def soft_cross_entropy(logits, target_probs, weights=None):
  """Cross-entropy against a target distribution per row (e.g. region fractions of a patch).

  logits, target_probs: [..., K]; rows are averaged (``weights`` [...] masks rows).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return masked_mean(-jnp.sum(target_probs * logp, axis=-1), weights)


def pooled_feature_cosine(pred_tokens, target_tokens, member, eps: float = 1e-6):
  """1 - cosine between the mean predicted and mean target token over ``member`` tokens.

  pred_tokens, target_tokens: [B, N, D]; member: [B, N] (1 = token of the component).
  Examples with no member token are left out of the mean.
  """
  member = member.astype(jnp.float32)
  count = member.sum(-1, keepdims=True)
  pool = lambda t: jnp.sum(t.astype(jnp.float32) * member[..., None], 1) / jnp.maximum(count, 1.0)
  cos = jnp.sum(_l2_normalize(pool(pred_tokens), eps) * _l2_normalize(pool(target_tokens), eps), -1)
  return masked_mean(1.0 - cos, (count[:, 0] > 0).astype(jnp.float32))
