"""The Encoding layer and the Context Encoding Module (Zhang et al., CVPR 2018, Sec. 2).

A single file that imports nothing but torch: copy it into your project.

    Encoding             Eq. 1: soft-assign N features to K codewords, aggregate the residuals  B×C×H×W → B×K×C
    EncodingDrop         Encoding whose smoothing factors are redrawn every training step (Sec. 3.5)
    SampleDropout        dropout whose masks are drawn per sample from a seed the trainer gives (seed_samples),
                         so that N processes drop what one process would (used before the classifiers)
    EncModule            the Context Encoding Module of Fig. 2: featuremap attention γ and SE-loss logits
    semantic_encoder, encoded_semantics   its Encoding → BN → ReLU → mean path (also the stage-3 module's)
    se_targets           ground truth of the Semantic Encoding loss: which classes each image contains
    encode_materialised  Eq. 1 as written, B×N×K×C: the reference of the tests and benchmarks

Memory. The textbook form of Eq. 1 broadcasts r_ik = x_i − d_k into a B×N×K×C tensor
(4 images × 60×60 × 32 codes × 512 channels = 944 MB in fp32, kept for backward). This file
never builds it. With the squared distance expanded,

    ‖x_i − d_k‖² = ‖x_i‖² − 2 x_i·d_k + ‖d_k‖²          → one batched matmul  D·X      (K×C @ C×N)
    e_k = Σ_i a_ik (x_i − d_k) = Σ_i a_ik x_i − (Σ_i a_ik) d_k   → one batched matmul  A·Xᵀ  (K×N @ N×C)

and a hand-written backward needs four more matmuls of the same size; everything else is
O(B·N·K) or a single pass over X. The largest tensor is the input itself.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class _EncodingFunction(torch.autograd.Function):
    """e = Encoding(x; D, s) with the residual tensor never materialised, forward or backward.

    x: B×C×N, codewords D: K×C, scale s: K  →  B×K×C. Works in x's dtype (fp32 or fp64).
    """

    @staticmethod
    def forward(ctx, x, codewords, scale):
        # Squared distances, laid out B×K×N so the softmax over codewords runs along dim 1.
        x_sq = torch.linalg.vector_norm(x, dim=1, keepdim=True).square()  # B×1×N
        d_sq = codewords.square().sum(1, keepdim=True)  # K×1
        dist = torch.matmul(codewords, x).mul_(-2).add_(x_sq).add_(d_sq)  # B×K×N
        # Eq. 1: a_ik = exp(−s_k‖r_ik‖²) / Σ_j exp(−s_j‖r_ij‖²)
        assign = torch.softmax(dist * -scale[:, None], dim=1)  # B×K×N
        # e_k = Σ_i a_ik x_i − (Σ_i a_ik) d_k
        encoded = torch.matmul(assign, x.transpose(1, 2))  # B×K×C
        encoded -= assign.sum(2, keepdim=True) * codewords
        ctx.save_for_backward(x, codewords, scale, assign, dist)
        return encoded

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_encoded):  # grad_encoded: B×K×C
        x, codewords, scale, assign, dist = ctx.saved_tensors
        g = grad_encoded.contiguous()
        # Through the aggregation: ∂L/∂a_ik = g_k · (x_i − d_k)
        grad_assign = torch.matmul(g, x) - (g * codewords).sum(2, keepdim=True)  # B×K×N
        # Softmax over k, then logits = −s_k · dist_ik.
        grad_logits = assign * (grad_assign - (assign * grad_assign).sum(1, keepdim=True))
        grad_scale = -(grad_logits * dist).sum((0, 2))  # K
        grad_dist = grad_logits * -scale[:, None]  # B×K×N
        # x receives Σ_k a_ik g_k (aggregation) and Σ_k ∂dist_ik (2x_i − 2d_k) (distance);
        # the two K-sums over matrices are fused into one matmul with 2K columns.
        lhs = torch.cat([g.transpose(1, 2), (-2 * codewords.t()).expand(x.shape[0], -1, -1)], 2)  # B×C×2K
        grad_x = torch.matmul(lhs, torch.cat([assign, grad_dist], 1))  # B×C×N
        grad_x.addcmul_(x, grad_dist.sum(1, keepdim=True), value=2)
        # D receives −(Σ_i a_ik) g_k (aggregation) and Σ_i ∂dist_ik (2d_k − 2x_i) (distance).
        grad_codewords = (
            torch.matmul(grad_dist, x.transpose(1, 2)).sum(0).mul_(-2)
            + 2 * grad_dist.sum((0, 2))[:, None] * codewords
            - (assign.sum(2, keepdim=True) * g).sum(0)
        )  # K×C
        return grad_x, grad_codewords, grad_scale


def encode_materialised(x, codewords, scale):
    """Eq. 1 exactly as written, with the B×N×K×C residual tensor r_ik = x_i − d_k (what other pure-PyTorch
    ports do). The reference the tests check `encode` against and the alternative bench.py times; its
    memory grows with B·N·K·C, so never use it in a model. x: B×C×H×W or B×C×N → B×K×C."""
    X = x.flatten(2).transpose(1, 2)  # B×N×C
    residuals = X[:, :, None, :] - codewords[None, None]  # B×N×K×C
    assign = torch.softmax(-scale * residuals.pow(2).sum(-1), dim=2)  # B×N×K, softmax over codewords
    return (assign[..., None] * residuals).sum(1)  # B×K×C


def encode(x, codewords, scale):
    """Functional Encoding layer (Eq. 1). x: B×C×H×W or B×C×N → B×K×C.

    Under autocast the whole layer runs in float32: the expanded distance ‖x‖² − 2x·d + ‖d‖²
    cancels catastrophically in bf16/fp16 when x lies near a codeword. The result is returned
    in the autocast dtype, as a matmul's would be.
    """
    x = x.flatten(2)  # B×C×N; a view also for channels_last input
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            out = _EncodingFunction.apply(x.float(), codewords.float(), scale.float())
        return out.to(torch.get_autocast_dtype(device))
    dtype = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 input without autocast → fp32 math
    out = _EncodingFunction.apply(x.to(dtype), codewords.to(dtype), scale.to(dtype))
    return out.to(x.dtype)


class Encoding(nn.Module):
    """Encoding layer (Eq. 1): B×C×H×W features → B×K×C residual encoders.

    e_k = Σ_i a_ik (x_i − d_k),  a_ik = softmax_k(−s_k ‖x_i − d_k‖²)

    Sign convention: the paper's. `scale` holds s_k and a positive s_k means a sharper
    assignment. (The released code stores −s_k and draws it from U(−1, 0); same function.)
    """

    def __init__(self, channels, num_codes):
        super().__init__()
        self.channels, self.num_codes = channels, num_codes
        self.codewords = nn.Parameter(torch.empty(num_codes, channels))  # K×C, the dictionary D
        self.scale = nn.Parameter(torch.empty(num_codes))  # K, smoothing factors s
        self.reset_parameters()

    def reset_parameters(self):
        bound = (self.num_codes * self.channels) ** -0.5  # as released: U(±1/√(K·C))
        nn.init.uniform_(self.codewords, -bound, bound)
        nn.init.uniform_(self.scale, 0, 1)

    def forward(self, x):  # B×C×H×W → B×K×C
        return encode(x, self.codewords, self.scale)

    def extra_repr(self):
        return f"channels={self.channels}, num_codes={self.num_codes}"


class EncodingDrop(Encoding):
    """Encoding with the smoothing factors as a regulariser (Sec. 3.5, CIFAR-10).

    The paper saw the learned s_k settle near 0.5 and found it better to draw them from
    U(0, 1) in every training forward and to use 0.5 at evaluation. `scale` is therefore a
    buffer holding the factors of the latest forward, not a learned parameter.
    """

    def __init__(self, channels, num_codes):
        super().__init__(channels, num_codes)
        del self.scale
        self.register_buffer("scale", torch.full((num_codes,), 0.5))

    def reset_parameters(self):
        bound = (self.num_codes * self.channels) ** -0.5
        nn.init.uniform_(self.codewords, -bound, bound)

    def forward(self, x):
        if self.training:
            self.scale.uniform_(0, 1)
        else:
            self.scale.fill_(0.5)
        return encode(x, self.codewords, self.scale)


class SampleDropout(nn.Module):
    """Dropout of single activations, or of whole channels (channelwise: as nn.Dropout2d), whose masks can be
    drawn per sample: after seed_samples(model, seeds) the training forward draws sample i's mask from a
    generator seeded with seeds[i]. A trainer that derives seed i from (seed, iteration, the sample's index in
    the global batch) drops the same units whatever the number of processes the batch is split over; without
    seeds it is nn.Dropout / nn.Dropout2d, on torch's global RNG. Identity in eval mode, no parameters."""

    def __init__(self, p=0.5, channelwise=False):
        super().__init__()
        self.p, self.channelwise, self.sample_seeds = p, channelwise, None

    def forward(self, x):  # B×C×H×W (or B×C)
        if not self.training or self.p == 0:
            return x
        if self.sample_seeds is None:
            return (F.dropout2d if self.channelwise else F.dropout)(x, self.p, True)
        if len(self.sample_seeds) != x.shape[0]:
            raise ValueError(f"seed_samples gave {len(self.sample_seeds)} seeds for a batch of {x.shape[0]}")
        shape = x.shape[1:2] + (1,) * (x.dim() - 2) if self.channelwise else x.shape[1:]
        keep = torch.stack([torch.rand(shape, device=x.device, generator=torch.Generator(x.device).manual_seed(s))
                            for s in self.sample_seeds]) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)

    def extra_repr(self):
        return f"p={self.p}, channelwise={self.channelwise}"


def seed_samples(module, seeds):
    """Give every SampleDropout in `module` one seed per sample of the next training forward (ints)."""
    for m in module.modules():
        if isinstance(m, SampleDropout):
            m.sample_seeds = list(seeds)


class EncModule(nn.Module):
    """Context Encoding Module (Sec. 2, Fig. 2).

    x (B×C×H×W) → 1×1 conv + BN + ReLU → Encoding (B×K×C) → BN over the K encoders + ReLU
    → mean over K = encoded semantics e (B×C). Then
      featuremap attention  γ = sigmoid(W e),  y = x ⊗ γ  (channel-wise)
      SE-loss branch        se_logits = W_se e  (B×num_classes), trained with BCE against
                            the classes present in the image (see `se_targets`).

    residual=True returns relu(x + x ⊗ γ), the form of the released code behind its
    published numbers, instead of the paper's x ⊗ γ.
    num_codes=0 replaces the Encoding layer by global average pooling (K = 0 in Fig. 5).
    """

    def __init__(self, channels, num_classes, num_codes=32, se_loss=True, residual=False,
                 norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.residual = residual
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False), norm_layer(channels), nn.ReLU(inplace=True))
        # BatchNorm over the codeword axis (input B×K×C); a SyncBatchNorm handles any rank.
        self.encoding = semantic_encoder(channels, num_codes, nn.BatchNorm1d if norm_layer is nn.BatchNorm2d
                                         else norm_layer)
        self.attention = nn.Linear(channels, channels)
        self.se_classifier = nn.Linear(channels, num_classes) if se_loss else None

    def forward(self, x):  # B×C×H×W → (B×C×H×W, B×num_classes or None)
        semantics = encoded_semantics(self.encoding, self.reduce(x))  # B×C
        gamma = torch.sigmoid(self.attention(semantics))  # B×C
        y = x * gamma[:, :, None, None]
        if self.residual:
            y = F.relu(x + y)
        se_logits = self.se_classifier(semantics) if self.se_classifier is not None else None
        return y, se_logits


def semantic_encoder(channels, num_codes, norm_1d=nn.BatchNorm1d):
    """Encoding (K codewords) → BN over the K encoders → ReLU: B×C×H×W → B×K×C, as in Fig. 2.
    None for num_codes = 0, where global average pooling takes its place (Fig. 5's K = 0)."""
    if num_codes < 0:
        raise ValueError(f"num_codes must be ≥ 0 (0: global average pooling), not {num_codes}")
    if num_codes == 0:
        return None
    return nn.Sequential(Encoding(channels, num_codes), norm_1d(num_codes), nn.ReLU(inplace=True))


def encoded_semantics(encoder, features):
    """The encoded semantics e of Fig. 2: the encoders averaged over the K codewords (B×K×C → B×C);
    with no encoder (K = 0), the features averaged over the image (B×C×H×W → B×C)."""
    if encoder is None:
        return features.mean((2, 3))
    return encoder(features).mean(1)


def se_targets(labels, num_classes, ignore_index=-1):
    """Ground truth of the SE-loss: B×H×W int labels → B×num_classes float 0/1.

    Class c is 1 for an image when at least one of its (not ignored) pixels has label c.
    """
    flat = labels.reshape(labels.shape[0], -1)
    # Send ignored pixels to an extra column that is dropped afterwards.
    flat = torch.where(flat == ignore_index, num_classes, flat)
    present = torch.zeros(flat.shape[0], num_classes + 1, device=labels.device)
    present.scatter_(1, flat, 1.0)
    return present[:, :num_classes]
