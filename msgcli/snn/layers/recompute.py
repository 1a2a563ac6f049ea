"""Blocks that save little for backward and recompute the rest there: ``model.recompute`` over the
conv-BatchNorm-LIF runs of a :class:`SpikingSequential`.

Two depths, one autograd Function (:class:`RecomputedBlock`):

* a conv-BN-LIF block whose convolution takes spikes (``recomputed_block``) saves only its input spikes,
  packed (:mod:`msgcli.snn.packing`), and backward recomputes the convolution, the normalisation and the
  membrane;
* a BatchNorm-LIF pair after any other layer (``lean_bn_lif``: the stem's convolution of events or
  images, say) saves only the BatchNorm's input, one float tensor, and backward recomputes the
  normalisation and the membrane from it with the same kernels, on the same numbers: exact, not merely
  close.

Both save, besides, the ``[T, C]`` BatchNorm statistics and the membrane where each chunk of timesteps starts.
Backward works one chunk at a time, latest first, so the largest tensors alive are a chunk's, not the layer's:
the chunk's current and its gradient, which takes the place of the spikes' gradient where the block owns that
one. With per-step statistics a block convolves one timestep at a time, forward and backward, so neither its
input nor its input's gradient exists in float for more than a timestep (beyond the input's gradient autograd
passes on; by samples, below: for more than a part), bar a block whose images come out small
(:data:`SMALL_IMAGE`), which convolves a chunk per call; and a block followed by an average pool (VGG's) runs
the pool inside: only the pooled spikes leave the block, and the spikes' gradient exists one chunk at a time.
Where the C pair kernel runs the LIF (the CPU), a chunk's current stays in its pieces and the LIF's and the
BatchNorm's backward run a few samples at a time (:meth:`_Block.backward_in_parts`), writing the current's
gradient over the pieces, each freed once the convolution's backward has used it: no gradient of the chunk
then exists for the whole batch beside its current. Where no chunk size is asked for (the default), a block
whose convolution is cheap to run again (:data:`RERUN_FAN_IN`: VGGSNN's first two, the widest) goes by samples
instead (:meth:`_Block.backward_by_samples`): its backward runs over all T a part of the batch at a time (at
least :data:`PART_ENTRIES` entries of current), recomputing each part's current twice (for the BatchNorm's
sums over the batch, then for the gradients they make) and running the convolution's backward once per part,
so neither a chunk's current for the whole batch nor a membrane where a chunk starts is kept, for one more run
of the convolution. At the other end, a narrow block whose convolution is dear to run again
(:class:`CurrentBudget`: VGGSNN's three 512-to-512 blocks) keeps its current, as the default path does, and is
not recomputed. Per-step statistics make a chunk self-contained (its timesteps' statistics are its own, saved
from the forward, so the running statistics are updated once, in the forward); joint statistics span all T,
and so take one chunk. The MSG mask is drawn in the LIF's backward, chunks latest first: the same draws in the
same order as one call over T. What backward recomputes is what forward computed, so the gradients are those
of plain autograd through the same kernels (to float rounding where chunks add the weight gradients in another
order).

Where the BatchNorm and the LIF run on one family of fused kernels that has the pair in one kernel (the C
kernels; the Triton kernels on CUDA where ``MSGSNN_TRITON_BN=1`` puts the BatchNorm on them), the pair's
forward writes only the spikes and its backward recomputes the current and the membrane inside the LIF's
backward kernel, so a pair costs no more time than the two layers run one by one, and the default path runs
every BatchNorm-LIF pair leanly there: one float tensor per spiking layer, with the convolutions keeping their
input spikes as bits and average pools of spikes keeping nothing (:mod:`.spike_conv`); a pool after a pair
runs inside it, so that the spikes' gradient in backward is the pair's own buffer, where the gradient of the
BatchNorm's input ends. Elsewhere (torch operators; CUDA with torch's ``batch_norm``, its default) recomputing
costs passes of its own, so the default path runs the layers one by one. The Triton pair draws its MSG masks
from a key: a block's chunks share one, each drawing its timesteps' masks of the whole sequence, so chunks
change no mask there either."""

from __future__ import annotations

import math

import torch
from torch import nn

from msgcli.snn import kernels, memory, packing
from msgcli.snn.kernels.ops import affine, batch_statistics, dense, normalise_backward, normalise_backward_from_sums
from msgcli.snn.layers.batchnorm import TemporalBatchNorm, _batchnorm_kernels, _check_count, _torch_batch_norm_applies
from msgcli.snn.layers.folded import Folded
from msgcli.snn.layers.spike_conv import avg_pool_backward, pooled_levels, takes_spike_codes, unhooked
from msgcli.snn.layers.sync import synchronised
from msgcli.snn.memory import step_layout
from msgcli.snn.neuron import LIF, levels_of, mark_levels


RERUN_FAN_IN = 576
"""A convolution with at most this many inputs per output (64 channels of 3x3: VGGSNN's stem and second block,
ResNet18's first stage) runs once more in backward rather than keep a chunk of its current: its block's backward
goes by samples (:meth:`_Block.backward_by_samples`). These blocks have the widest currents for the least work."""

SMALL_IMAGE = 256
"""A per-step block whose convolution makes images of at most this many pixels (VGGSNN's last four at 48x48 input:
12x12 and 6x6) convolves a chunk of timesteps per call rather than one timestep: a timestep of a batch of such small
images is too small a call for oneDNN (at batch 16, 10 % slower at 12x12, 20 % at 6x6), and a chunk of their
current is small beside the wider blocks' chunks that backward keeps."""

KEEP_FAN_IN = 4608
"""A convolution with at least this many inputs per output (512 channels of 3x3) may keep its block's current rather
than run again in backward (:class:`CurrentBudget`): its second run costs the most time per byte it saves. Keeping
the 256-to-512 block of VGGSNN too (2304 inputs) saved little more time and raised the float32 peak by about
3 MiB per sample."""

PART_ENTRIES = 16 * 64 * 48 * 48
"""Entries of the current (timesteps x samples x channels x height x width) that one part of
:meth:`_Block.backward_by_samples` recomputes at once, at least: 16 images of VGGSNN's stem at 48x48 (a sample a
part at T = 10 there and in its 64-to-128 block). Parts of a few small images would be calls that cost more than
they compute; the part's tensors stay this size whatever the batch."""


def _chunks(T: int, size: int) -> list[tuple[int, int]]:
    return [(t, min(t + size, T)) for t in range(0, T, size)]


def _byte_unit(per_sample: int) -> int:
    """The fewest samples of ``per_sample`` entries that fill whole bytes of bits: parts of a batch start there."""
    return 8 // math.gcd(per_sample, 8)


def _conv_backward(conv: nn.Conv2d, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs):
    """``conv``'s input, weight and bias gradients (each None unless ``needs`` says so) for the output gradient
    ``grad`` of input ``x`` (both ``[N, C, H, W]``), in ``grad``'s dtype."""
    need_x, need_w, need_b = needs
    dtype = grad.dtype
    return torch.ops.aten.convolution_backward(
        grad, x.to(dtype), weight.to(dtype), None if conv.bias is None else list(conv.bias.shape), list(conv.stride),
        list(conv.padding), list(conv.dilation), False, [0, 0], conv.groups,
        [need_x, need_w, conv.bias is not None and need_b])


def _output_size(conv: nn.Conv2d, image: tuple[int, int]) -> tuple[int, int]:
    """The height and width of ``conv``'s output for an input of ``image`` (height, width)."""
    if conv.padding == "same":
        return image
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, p, d, k, s in zip(image, padding, conv.dilation, conv.kernel_size, conv.stride))


def _accumulate(grads: list, gw, gb) -> None:
    """Add a piece's convolution weight and bias gradients into ``grads``, in float32 at least (a float64 model's
    stay float64: they would otherwise come back with float32's rounding)."""
    for i, g in enumerate((gw, gb)):
        if g is not None:
            grads[i] = g.to(torch.promote_types(g.dtype, torch.float32)) if grads[i] is None else grads[i].add_(g)


class _Block:
    """The modules of one block and how this call runs them."""

    def __init__(self, conv: nn.Conv2d | None, bn: TemporalBatchNorm, lif: LIF, levels: int | None,
                 chunk: int | None, T: int, device: torch.device, pool: nn.AvgPool2d | None = None,
                 image: tuple[int, int] | None = None) -> None:
        self.conv, self.bn, self.lif, self.levels, self.pool = conv, bn, lif, levels, pool
        self.sync = bn.sync and synchronised()
        self.per_step = bn.mode == "per_step"
        self.chunk = (chunk or default_chunk(T)) if self.per_step else None
        # where no chunk was asked for and the convolution is cheap to run again, backward goes a few samples at
        # a time over all T (:meth:`backward_by_samples`); confirmed on the first piece's current in forward
        self.by_samples = (chunk is None and self.per_step and conv is not None
                           and conv.weight[0].numel() <= RERUN_FAN_IN)
        self.current_like = None  # a timestep's current: (shape [B, ...], strides), for backward's mask
        # timesteps a convolution runs at once in forward (and by chunks, in backward): one, where per-step
        # statistics allow, so that its input, its output and its input's gradient never exist for more than one
        # timestep; a chunk where its images (``image``: the input's height and width) come out small
        # (:data:`SMALL_IMAGE`)
        self.piece = self.chunk
        if (self.per_step and conv is not None
                and (image is None or math.prod(_output_size(conv, image)) > SMALL_IMAGE)):
            self.piece = 1
        self.levels_out = 1 if pool is None else pooled_levels(pool, 1)
        self.bn_ops = _batchnorm_kernels(device)
        self.lif_ops = lif.kernels(device)
        amp = device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
        self.autocast = (device.type, amp, torch.get_autocast_dtype(device.type) if amp else None)

    def current(self, x: torch.Tensor, weight, bias, steps: int) -> torch.Tensor:
        """The convolution of ``x [steps*B, C, H, W]`` as ``[steps, B, C', H', W']`` (``x`` itself without one)."""
        if self.conv is None:
            return x
        device, enabled, dtype = self.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            y = self.conv._conv_forward(x, weight, bias)
        return y.view(steps, -1, *y.shape[1:])

    def conv_weight(self, weight: torch.Tensor | None) -> torch.Tensor | None:
        """The convolution's ``weight`` as each piece's call takes it: in autocast's dtype and channels-last, like
        the pieces' input; cast and laid out once per pass rather than in every call (the same values)."""
        if weight is None:  # a BatchNorm-LIF pair without a convolution
            return weight
        _, enabled, dtype = self.autocast
        return weight.to(dtype if enabled else weight.dtype, memory_format=torch.channels_last)

    def statistics_view(self, current: torch.Tensor) -> torch.Tensor:
        return current if self.per_step else current.flatten(0, 1).unsqueeze(0)

    def coefficients(self, weight, bias, mean, invstd, steps: int):
        """The BatchNorm's ``scale, shift`` ``[steps, C]`` (joint statistics: the one row repeated)."""
        scale, shift = affine(weight, bias, mean, invstd)
        return scale.expand(steps, -1), shift.expand(steps, -1)

    def fire(self, current, scale, shift, state, out) -> torch.Tensor:
        """The LIF's spikes from the normalised ``current`` into ``out``, ``state`` carried."""
        lif = self.lif
        return self.lif_ops.bn_lif_chunk_forward(current, scale, shift, state, lif.tau, lif.v_threshold, lif.reset,
                                                 self.bn_ops, out)

    def samples_per_part(self, current: torch.Tensor) -> int | None:
        """Samples per part of the batch in which :meth:`backward_in_parts` runs a chunk of ``current``; None where
        it does not: a block without a convolution (its gradient is written into its input's, needed anyway) or
        kernels that cannot take the chunk's MSG mask drawn beforehand (the C pair kernel can). A part starts on a
        whole byte of the mask's bits."""
        if self.conv is None or self.bn_ops is not self.lif_ops or not self.lif_ops.fuses_bn_lif(current):
            return None
        if not hasattr(self.lif_ops.fused_kernels(), "draw_chunk_mask"):
            return None
        return _byte_unit(current[0, 0].numel())

    def part_backward(self, grad_out, current, b0: int, b1: int, mask, scale, shift, state, grad_state):
        """The gradient of the BatchNorm's output for samples ``b0:b1`` of the batch, ``current`` being theirs: the
        block's output gradient ``grad_out`` (spread over the pool's inputs where the block pools, else read by the
        kernel where it lies, with no copy of the part) through the LIF's backward, under the ``mask`` the fused
        kernels' ``draw_chunk_mask`` drew for the whole batch."""
        lif = self.lif
        grad = torch.empty_like(current)
        if self.pool is None:
            grad_spikes = grad_out[:, b0:b1]  # read in place by the kernel, where laid out as the current
        else:
            pooled = grad_out[:, b0:b1]
            grad_spikes = avg_pool_backward(self.pool, pooled.reshape(-1, *pooled.shape[2:]), current.flatten(0, 1),
                                            grad.flatten(0, 1)).view(current.shape)
        per_sample = current[0, 0].numel()
        bits = None if mask is None else (mask[0][b0 * per_sample // 8:], mask[1])
        self.lif_ops.fused_kernels().bn_lif_chunk_backward(grad_spikes, current, scale, shift, state, grad_state,
                                                           lif.tau, lif.v_threshold, lif.spec, lif.reset,
                                                           lif.detach_reset, grad, mask=bits)
        return grad

    def backward_in_parts(self, grad_out, currents: list[torch.Tensor], scale, shift, state, grad_state, bn_weight,
                          mean, invstd, count, samples: int):
        """:meth:`fire_backward` and then the BatchNorm's backward of one chunk, ``samples`` at a time, the current's
        gradient written over the current: neither the spikes' gradient nor the current's exists for the whole
        batch beside the current. ``currents``: the chunk's current as the forward's pieces made it (``[steps, B,
        ...]`` each, in order), so that backward can free each piece once the convolution's backward has used its
        gradient. ``grad_out``: the chunk's gradient of the block's output (pooled or not). Returns the BatchNorm
        weight's and bias's gradient terms.

        The BatchNorm's input gradient needs sums over the whole batch of the gradient it is given, so the LIF's
        backward runs twice for each part: for the sums, then for the gradient they make. The MSG mask is drawn
        once, for the whole chunk, as one call would draw it, and each part reads its samples' bits."""
        fused, lif, first = self.lif_ops.fused_kernels(), self.lif, currents[0]
        B, per_step = first.shape[1], first[0].numel()
        per_sample = per_step // B
        steps = sum(c.shape[0] for c in currents)
        shape = (steps, *first.shape[1:])
        like = torch.empty_strided(shape, (per_step, *first.stride()[1:]), dtype=first.dtype, device="meta")
        mask = fused.draw_chunk_mask(like, lif.spec)
        starts = [sum(c.shape[0] for c in currents[:i]) for i in range(len(currents))]

        def gradient(b0: int, b1: int, grad_state_part: torch.Tensor):
            """The part's current (a copy, laid out as the chunk's timesteps are) and the gradient of its
            BatchNorm's output, laid out alike (the kernel writes it over its input)."""
            part = (steps, b1 - b0, *first.shape[2:])
            x = memory.empty_strided(part, ((b1 - b0) * per_sample, *first.stride()[1:]), first.dtype, first.device)
            for s0, current in zip(starts, currents):
                x[s0:s0 + current.shape[0]] = current[:, b0:b1]
            return x, self.part_backward(grad_out, x, b0, b1, mask, scale, shift, state[b0:b1], grad_state_part)

        parts = [(b0, min(b0 + samples, B)) for b0 in range(0, B, samples)]
        sums = None
        for b0, b1 in parts:  # the membrane's gradient carried out of the chunk is the second pass's to write
            x, grad = gradient(b0, b1, grad_state[b0:b1].clone())
            part_sums = self.bn_ops.bn_backward_sums(self.statistics_view(grad), self.statistics_view(x), mean)
            sums = part_sums if sums is None else tuple(a + b for a, b in zip(sums, part_sums))
        grad_w, grad_b, coefficients = normalise_backward_from_sums(*sums, bn_weight, mean, invstd, count, self.sync,
                                                                    per_step=True)
        for b0, b1 in parts:
            x, grad = gradient(b0, b1, grad_state[b0:b1])
            view = self.statistics_view(grad)
            self.bn_ops.bn_backward_input(view, self.statistics_view(x), *coefficients, out=view)
            for s0, current in zip(starts, currents):
                current[:, b0:b1] = grad[s0:s0 + current.shape[0]]
        return grad_w, grad_b

    def backward_by_samples(self, grad_out, part_input, input_per_sample: int, weight, bias, scale, shift, bn_weight,
                            mean, invstd, count, grad_x, needs):
        """The block's backward over all T, a part of the batch at a time (:data:`PART_ENTRIES`), each part's
        current recomputed twice (for the BatchNorm's sums over the batch, then for the gradients they make; the
        last part's once, as the second pass takes it first) and its convolution's backward run in one call.
        Instead of a chunk's current for the whole batch (:meth:`backward_in_parts`) and the membranes where
        chunks start, a part's current lives, at the price of one more run of the convolution: for convolutions
        cheap to run again (``RERUN_FAN_IN``).
        ``part_input(b0, b1)``: the convolution's input of samples ``b0:b1``, ``[T * (b1 - b0), ...]``
        timestep-major, of ``input_per_sample`` entries a sample and timestep. ``grad_x`` (None where not needed)
        takes the input's gradient. Returns the convolution weight's and bias's gradients (float32 at least, None
        where not needed) and the BatchNorm weight's and bias's terms ``[T, C]``.

        The MSG mask is drawn once, for the whole batch and T, as one call over the block would draw it, and each
        part reads its samples' bits; each part starts on a whole byte of the mask's bits and of the input's."""
        fused, lif, conv = self.lif_ops.fused_kernels(), self.lif, self.conv
        T, B = grad_out.shape[:2]
        step_shape, step_stride = self.current_like
        per_sample = math.prod(step_shape[1:])
        like = torch.empty_strided((T, *step_shape), (B * per_sample, *step_stride), dtype=grad_out.dtype,
                                   device="meta")
        mask = fused.draw_chunk_mask(like, lif.spec)
        unit = math.lcm(_byte_unit(per_sample), _byte_unit(input_per_sample))
        size = unit * -(-max(1, PART_ENTRIES // (T * per_sample)) // unit)
        parts = [(b0, min(b0 + size, B)) for b0 in range(0, B, size)]

        def gradient(b0: int, b1: int):
            """The part's convolution input, current, and the gradient of its BatchNorm's output."""
            x = part_input(b0, b1)
            current = dense(self.current(x, weight, bias, T))
            # the membrane before t = 0, and its gradient after T
            start = torch.zeros_like(current[0], dtype=kernels.carry_dtype(current.dtype))
            grad = self.part_backward(grad_out, current, b0, b1, mask, scale, shift, start, torch.zeros_like(start))
            return x, current, grad

        sums, last = None, None
        for b0, b1 in parts:
            last = None  # the part before goes before this one is made
            last = gradient(b0, b1)
            part_sums = self.bn_ops.bn_backward_sums(last[2], last[1], mean)
            sums = part_sums if sums is None else tuple(a + b for a, b in zip(sums, part_sums))
        grad_w, grad_b, coefficients = normalise_backward_from_sums(*sums, bn_weight, mean, invstd, count, self.sync,
                                                                    per_step=True)
        conv_grads = [None, None]
        for b0, b1 in reversed(parts):  # the last part first: the first pass's is still there (one part: no rerun)
            x, current, grad = last if last is not None else gradient(b0, b1)
            last = None
            self.bn_ops.bn_backward_input(grad, current, *coefficients, out=grad)
            del current
            g = b1 - b0
            gx, gw, gb = _conv_backward(conv, grad.flatten(0, 1), x, weight, needs)  # the part's T * g images at once
            del x, grad
            if gx is not None:  # each timestep's rows of the part, in one copy
                grad_x.unflatten(0, (T, B))[:, b0:b1] = gx.unflatten(0, (T, g))
            del gx
            _accumulate(conv_grads, gw, gb)
        return conv_grads, (grad_w, grad_b)

    def fire_backward(self, grad_spikes, current, scale, shift, state, grad_state, out=None, key=None,
                      after: int = 0) -> torch.Tensor:
        """The gradient of :meth:`fire`'s normalised current (into ``out`` if given), its membrane recomputed from
        ``state`` (kept); a chunk followed by ``after`` timesteps, under the sequence's mask ``key``."""
        lif = self.lif
        return self.lif_ops.bn_lif_chunk_backward(grad_spikes, current, scale, shift, state, grad_state, lif.tau,
                                                  lif.v_threshold, lif.spec, lif.reset, lif.detach_reset, self.bn_ops,
                                                  out, key, after)


class RecomputedBlock(torch.autograd.Function):
    """``LIF(BN(conv(x)))`` of ``x [T, B, C, H, W]`` (average-pooled where the block has a pool), saving ``x``
    packed and recomputing the rest in backward.

    Returns the spikes and the batch mean and unbiased variance (for the running statistics).
    """

    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, bn_weight, bn_bias, block: _Block):
        T, B = x.shape[:2]
        if block.conv is None:  # x is the BatchNorm's input, chunked over its first dim, saved whole
            flat = x if step_layout(x) is not None else x.contiguous()
        else:
            flat = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        starts = {t0 for t0, _ in _chunks(T, block.chunk or T)[1:]}  # where backward's chunks need the membrane
        saved_inputs, states, means, invstds, variances = [], [], [], [], []
        out, state, count = None, None, 0
        rows = 1 if block.conv is None else B
        weight = block.conv_weight(conv_weight)
        if block.by_samples and block.levels and B * math.prod(flat.shape[1:]) % 8:
            block.piece = 1  # backward's parts read each timestep's bits from a whole byte on
        for t0, t1 in _chunks(T, block.piece or T):
            if t0 in starts:
                states.append(state.clone())
            xc = flat[t0 * rows: t1 * rows]
            if block.conv is not None:
                saved_inputs.append(packing.pack(xc, block.levels).planes if block.levels else xc)
            current = dense(block.current(xc, weight, conv_bias, t1 - t0))
            if t0 == 0:
                block.current_like = (tuple(current.shape[1:]), current.stride()[1:])
                if block.by_samples and block.samples_per_part(current) is None:
                    block.by_samples = False
                if block.by_samples:
                    starts = set()  # backward runs over all T at once: no membrane kept where a chunk starts
            steps = block.statistics_view(current)
            _check_count(steps, block.sync)
            mean, unbiased, invstd, count = batch_statistics(steps, block.bn.eps, block.sync, block.bn_ops)
            del steps
            if state is None:
                state = torch.zeros_like(current[0], dtype=kernels.carry_dtype(current.dtype))
            coefficients = block.coefficients(bn_weight, bn_bias, mean, invstd, t1 - t0)
            if block.pool is None:
                if out is None:  # the spikes, laid out like the current
                    out = memory.empty_strided((T, *current.shape[1:]), current.stride(), current.dtype, current.device)
                block.fire(current, *coefficients, state, out[t0:t1])
            else:  # only the pooled spikes outlive the piece
                spikes = block.fire(current, *coefficients, state, None)
                pooled = block.pool(spikes.flatten(0, 1))
                pooled = pooled.view(t1 - t0, B, *pooled.shape[1:])
                if out is None:
                    out = memory.empty_strided((T, *pooled.shape[1:]), pooled.stride(), pooled.dtype, pooled.device)
                out[t0:t1] = pooled
                del spikes, pooled
            del current
            means.append(mean)
            invstds.append(invstd)
            variances.append(unbiased)
        mean, invstd, unbiased = torch.cat(means), torch.cat(invstds), torch.cat(variances)
        if block.conv is None:
            saved_inputs.append(flat)
        ctx.save_for_backward(*saved_inputs, *states, conv_weight, bn_weight, bn_bias, mean, invstd)
        ctx.block, ctx.count, ctx.shape = block, count, (T, B, tuple(flat.shape), flat.stride(), x.dtype)
        ctx.n_inputs, ctx.n_states = len(saved_inputs), len(states)
        ctx.mark_non_differentiable(mean, unbiased)
        if x.device.type == "cpu":
            # the pieces' transient buffers (the spikes before the pool) came back to the CPU pool, which keeps
            # blocks freed where grad is off, as here; kept, they would stay resident through the whole step
            memory.pool.clear()
        return out, mean, unbiased

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        block = ctx.block
        if block.returns_pages and grad_out.device.type == "cpu":
            memory.return_free_memory()  # the blocks after this one freed their tensors: their pages go back
        T, B, flat_shape, flat_stride, x_dtype = ctx.shape
        saved = ctx.saved_tensors
        inputs, states = saved[:ctx.n_inputs], saved[ctx.n_inputs:ctx.n_inputs + ctx.n_states]
        conv_weight, bn_weight, bn_bias, mean, invstd = saved[ctx.n_inputs + ctx.n_states:]
        conv, weight = block.conv, block.conv_weight(conv_weight)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        scale, shift = affine(bn_weight, bn_bias, mean, invstd)
        grad_x = memory.empty_strided(flat_shape, flat_stride, x_dtype, grad_out.device) if need_x else None
        grads = [None, None]  # conv weight, conv bias, summed in float32 at least
        bn_terms = ([], [])  # the BatchNorm weight's and bias's gradient terms [t, C], chunks latest first
        grad_state = None
        piece = block.piece or T

        def pieces(t0: int, t1: int) -> list[tuple[int, int, int]]:
            """``(p, s0, s1)``: the forward's pieces (index, first and end timestep) that make up ``[t0, t1)``."""
            return [(p, p * piece, min(p * piece + piece, T)) for p in range(t0 // piece, -(-t1 // piece))]

        def block_input(p: int, s0: int, s1: int) -> torch.Tensor:
            """The convolution's input of piece ``p`` (timesteps ``s0`` to ``s1``), decoded from its bits."""
            if not block.levels:
                return inputs[p]
            shape = ((s1 - s0) * B, *flat_shape[1:])
            return packing.unpack(packing.Packed(inputs[p], shape, flat_stride, block.levels), x_dtype)

        def recomputed_pieces(t0: int, t1: int) -> list[torch.Tensor]:
            """The current of timesteps ``[t0, t1)``, one tensor per piece of the forward (``[s1 - s0, B, ...]``)."""
            return [dense(block.current(block_input(p, s0, s1), weight, conv.bias, s1 - s0))
                    for p, s0, s1 in pieces(t0, t1)]

        def joined(parts: list[torch.Tensor]) -> torch.Tensor:
            """The pieces ``parts`` of a chunk's current as one tensor, each piece let go once copied."""
            first = parts[0]
            current = memory.empty_strided((sum(part.shape[0] for part in parts), *first.shape[1:]), first.stride(),
                                           first.dtype, first.device)
            start = 0
            while parts:
                part = parts.pop(0)
                current[start:start + part.shape[0]] = part
                start += part.shape[0]
            return current

        input_per_sample = math.prod(flat_shape[1:])

        def part_input(b0: int, b1: int) -> torch.Tensor:
            """The convolution's input of samples ``b0:b1`` over all T, timestep-major, decoded from the bytes of
            their bits (a timestep's samples begin on a whole byte of its piece's: the forward sees to it)."""
            g = b1 - b0
            firsts = [(inputs[t // piece], t % piece * B) for t in range(T)]  # each timestep's piece and first row
            if block.levels and g * input_per_sample % 8 == 0:  # whole bytes a timestep: side by side, the part's
                planes = torch.cat([bits[:, (r + b0) * input_per_sample // 8:(r + b1) * input_per_sample // 8]
                                    for bits, r in firsts], dim=1)
                return packing.unpack(packing.Packed(planes, (T * g, *flat_shape[1:]), flat_stride, block.levels),
                                      x_dtype)
            x = memory.empty_strided((T * g, *flat_shape[1:]), flat_stride, x_dtype, grad_out.device)
            for t, (saved_input, r) in enumerate(firsts):
                if block.levels:
                    planes = saved_input[:, (r + b0) * input_per_sample // 8:
                                         -(-(r + b1) * input_per_sample // 8)].contiguous()
                    rows = packing.unpack(packing.Packed(planes, (g, *flat_shape[1:]), flat_stride, block.levels),
                                          x_dtype)
                else:
                    rows = saved_input[r + b0:r + b1]
                x[t * g:(t + 1) * g] = rows
            return x

        if block.by_samples:
            grads, terms = block.backward_by_samples(
                grad_out, part_input, input_per_sample, weight, conv.bias, scale.expand(T, -1),
                shift.expand(T, -1), bn_weight, mean, invstd, ctx.count, grad_x, (need_x, need_w, need_b))
            for kept, term, needed in zip(bn_terms, terms, ctx.needs_input_grad[3:5]):
                if needed:
                    kept.append(term)
        chunks = [] if block.by_samples else _chunks(T, block.chunk or T)
        # one key for all chunks, where the pair's kernels draw masks from keys: the masks of one call over T
        key = block.lif_ops.mask_key(grad_out, block.lif.spec) if block.bn_ops is block.lif_ops else None
        for k in reversed(range(len(chunks))):
            t0, t1 = chunks[k]
            # the parts' path keeps the forward's pieces apart, so that each is freed once its gradient is used
            currents = recomputed_pieces(t0, t1) if conv is not None else [dense(inputs[0][t0:t1])]
            samples = block.samples_per_part(currents[0])
            if samples is None and len(currents) > 1:
                currents = [joined(currents)]
            first = currents[0]
            rows = slice(t0, t1) if block.per_step else slice(0, 1)
            carry = kernels.carry_dtype(first.dtype)
            state = states[k - 1] if k else torch.zeros_like(first[0], dtype=carry)
            if grad_state is None:
                grad_state = torch.zeros_like(first[0], dtype=carry)
            scale_rows, shift_rows = scale[rows].expand(t1 - t0, -1), shift[rows].expand(t1 - t0, -1)
            if samples is not None:
                terms = block.backward_in_parts(grad_out[t0:t1], currents, scale_rows, shift_rows, state, grad_state,
                                                bn_weight, mean[rows], invstd[rows], ctx.count, samples)
            else:
                current = currents.pop()
                # where the pair has no convolution before it, the gradients end in grad_x's rows: the current's
                # and then the BatchNorm's input's (and before them the spikes', where the block pools)
                rows_x = grad_x[t0:t1] if conv is None and need_x else None
                if block.pool is None:
                    grad_spikes, into = grad_out[t0:t1], rows_x
                else:  # the spikes' gradient, this chunk's own: the current's gradient takes its place
                    pooled = grad_out[t0:t1]
                    grad_spikes = avg_pool_backward(block.pool, pooled.reshape(-1, *pooled.shape[2:]),
                                                    current.flatten(0, 1),
                                                    None if rows_x is None else rows_x.view(-1, *rows_x.shape[2:]))
                    grad_spikes = grad_spikes.view(current.shape)
                    into = grad_spikes if block.lif_ops.gradient_in_place() else None
                grad_y = block.fire_backward(grad_spikes, current, scale_rows, shift_rows, state, grad_state, into, key,
                                             T - t1)
                del grad_spikes
                view = block.statistics_view(grad_y)
                grad_current, *terms = normalise_backward(view, block.statistics_view(current), bn_weight, mean[rows],
                                                          invstd[rows], ctx.count, block.sync, block.bn_ops,
                                                          per_step=True, out=view)
                if rows_x is not None and into is None:  # a kernel that writes its own buffer
                    rows_x.copy_(grad_current.reshape(current.shape))
                currents.append(grad_current.reshape(current.shape))
                del grad_y, view, grad_current, current
            for kept, term, needed in zip(bn_terms, terms, ctx.needs_input_grad[3:5]):
                if needed:
                    kept.append(term)
            del first
            if conv is None:
                continue
            # the current's gradient, piece by piece (one piece where the chunk ran whole), latest first
            chunk_pieces = pieces(t0, t1)
            apart = len(currents) == len(chunk_pieces)
            for p, s0, s1 in reversed(chunk_pieces):
                grad_current = currents[-1] if apart else currents[0][s0 - t0:s1 - t0]
                gx, gw, gb = _conv_backward(conv, grad_current.flatten(0, 1), block_input(p, s0, s1), weight,
                                            (need_x, need_w, need_b))
                if apart:
                    currents.pop()  # this piece's gradient is used: freed
                del grad_current
                if need_x:
                    grad_x[s0 * B: s1 * B] = gx
                del gx
                _accumulate(grads, gw, gb)
            currents.clear()
        grad_bn = [_cast(torch.cat(kept[::-1]).sum(0), bn_weight) if kept else None for kept in bn_terms]
        if conv is None:
            return grad_x, None, None, *grad_bn, None
        grad_x = None if grad_x is None else grad_x.view(T, B, *flat_shape[1:])
        return (grad_x, _cast(grads[0], conv_weight), _cast(grads[1], conv.bias), *grad_bn, None)


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


def recomputable(modules) -> bool:
    """``modules`` are a block :class:`RecomputedBlock` reproduces: a plain 2-D convolution on the folded batch, a
    :class:`TemporalBatchNorm` and a LIF off the reference backend."""
    if len(modules) != 3:
        return False
    folded, bn, lif = modules
    return (isinstance(folded, Folded) and isinstance(folded.module, nn.Conv2d) and takes_spike_codes(folded.module)
            and _leans(bn, lif))


def _leans(bn, lif) -> bool:
    """A TemporalBatchNorm and a LIF off the reference backend, each with its own forward and no hooks (which
    the fused pair would not call)."""
    return (isinstance(bn, TemporalBatchNorm) and isinstance(lif, LIF) and lif.backend != "reference"
            and unhooked(bn, TemporalBatchNorm) and unhooked(lif, LIF))


def lean_applies(modules, x: torch.Tensor, fused_only: bool = False) -> bool:
    """``modules`` are a BatchNorm with per-step statistics and a LIF that :func:`lean_bn_lif` runs, on ``x``'s
    device: the CPU, or CUDA where the Triton BatchNorm runs the per-step statistics (by default torch's
    ``batch_norm`` does, see :mod:`.batchnorm`). ``fused_only``: and one kernel fuses the pair for ``x``."""
    if len(modules) != 2 or not _leans(*modules) or x.dim() < 3 or x.device.type not in ("cpu", "cuda"):
        return False
    bn, lif = modules
    if bn.mode != "per_step" or _torch_batch_norm_applies(x, bn.sync and synchronised()):
        return False
    ops = lif.kernels(x.device)
    return not fused_only or (ops is _batchnorm_kernels(x.device) and ops.fuses_bn_lif(x))


def default_chunk(T: int) -> int:
    """Timesteps per chunk in backward: half the sequence past T = 4 (a saved membrane per layer, against half the
    widest layer's transient tensors), else the whole."""
    return -(-T // 2) if T > 4 else T


def _run(x, conv: nn.Conv2d | None, bn: TemporalBatchNorm, lif: LIF, chunk: int | None,
         pool: nn.AvgPool2d | None = None, returns_pages: bool = False) -> torch.Tensor:
    block = _Block(conv, bn, lif, levels_of(x), chunk, x.shape[0], x.device, pool, tuple(x.shape[-2:]))
    # recomputing blocks hand the heap's free pages back before their backward (:func:`memory.return_free_memory`);
    # the default path's pairs do not: there it raised the peak
    block.returns_pages = returns_pages or conv is not None
    weight, bias = (None, None) if conv is None else (conv.weight, conv.bias)
    spikes, mean, var = RecomputedBlock.apply(x, weight, bias, bn.weight, bn.bias, block)
    if bn.track_running_stats and bn.running_mean is not None:
        bn._sequential_running_update(mean, var)
    return spikes if block.levels_out is None else mark_levels(spikes, block.levels_out)


def lean_bn_lif(x: torch.Tensor, bn: TemporalBatchNorm, lif: LIF, chunk: int,
                pool: Folded | None = None, returns_pages: bool = False) -> torch.Tensor:
    """Spikes of ``lif(bn(x))`` (and ``pool``'s average of them), saving only ``x`` (and statistics) for backward;
    the running statistics updated once. ``returns_pages``: as a recomputing block, before backward."""
    return _run(x, None, bn, lif, chunk, None if pool is None else pool.module, returns_pages)


def recomputed_block(x: torch.Tensor, folded: Folded, bn: TemporalBatchNorm, lif: LIF, chunk: int | None,
                     pool: Folded | None = None, budget: "CurrentBudget | None" = None) -> torch.Tensor:
    """Spikes of ``lif(bn(folded(x)))`` (and ``pool``'s average of them), saving only ``x`` as bits; the running
    statistics updated once. ``chunk``: timesteps per chunk in backward; None: by samples where the convolution is
    cheap to run again (:data:`RERUN_FAN_IN`), else :func:`default_chunk`, bar a block that ``budget`` lets keep
    its current: that one runs as the default path does."""
    if x.dim() != 5:
        raise ValueError(f"recompute: expected a block input [T, B, C, H, W], got shape {tuple(x.shape)}")
    if budget is not None and budget.keeps(x, folded.module, bn, lif, chunk):
        current = folded(x)  # the input spikes kept as bits, as in every recomputed block
        return lean_bn_lif(current, bn, lif, current.shape[0], pool, returns_pages=True)
    return _run(x, folded.module, bn, lif, chunk, None if pool is None else pool.module)


class CurrentBudget:
    """Which blocks of one :class:`SpikingSequential` call keep their current, one float per neuron as the default
    path does, instead of recomputing it, where no chunk size is asked for (on the CPU): a block whose convolution
    costs the most per byte a second run would save (:data:`KEEP_FAN_IN` inputs per output or more) and whose
    current is at most a quarter of the widest one recomputed before it in the call, while the kept currents
    together stay within that widest one. Backward runs them before the wide blocks, so what they keep is gone by
    the peak there. VGGSNN at 48x48 keeps its three 512-to-512 blocks (12x12 and 6x6): its step about 0.92x, the
    activation memory within the spread of runs. Blocks of separate calls (a ResNet's residual blocks) are all
    recomputed."""

    def __init__(self) -> None:
        self.widest = 0  # the widest recomputed current so far, in neurons per sample and timestep
        self.kept = 0

    def keeps(self, x: torch.Tensor, conv: nn.Conv2d, bn: TemporalBatchNorm, lif: LIF, chunk: int | None) -> bool:
        size = conv.out_channels * math.prod(_output_size(conv, tuple(x.shape[-2:])))
        if (chunk is None and x.device.type == "cpu" and conv.weight[0].numel() >= KEEP_FAN_IN
                and 4 * size <= self.widest and self.kept + size <= self.widest
                and lean_applies([bn, lif], x, fused_only=True)):
            self.kept += size
            return True
        self.widest = max(self.widest, size)
        return False


def _pool_at(modules: list[nn.Module], i: int) -> Folded | None:
    """``modules[i]`` where it is a folded average pool with no hooks, which the block or pair before it can run
    inside (only the pooled spikes then leave it); else None."""
    pool = modules[i] if i < len(modules) else None
    if (isinstance(pool, Folded) and unhooked(pool, Folded) and type(pool.module) is nn.AvgPool2d
            and unhooked(pool.module, nn.AvgPool2d)):
        return pool
    return None


class SpikingSequential(nn.Sequential):
    """``nn.Sequential`` (same children, same state_dict keys) that runs in training each BatchNorm-LIF pair
    through :func:`lean_bn_lif` where one kernel fuses it (``lean`` None, the default; True: wherever the pair
    runs leanly, False: never), with the average pool after it inside, and once :func:`set_recompute` has switched
    it on, each conv-BN-LIF block through :func:`recomputed_block`. Off recompute, the layers of child
    SpikingSequentials run in this one's loop (:meth:`_spliced`), so that a pair can take the pool that follows its
    block and each layer's input is let go as soon as the layer has run."""

    recompute = False
    lean: bool | None = None
    recompute_chunk: int | None = None  # timesteps per recomputed chunk; None: by samples or default_chunk(T)

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled()) or torch.compiler.is_compiling() \
                or (self.lean is False and not self.recompute):
            return super().forward(x)  # compiled: the layers' operators, one opaque node each
        modules = self._spliced()
        budget = CurrentBudget() if self.recompute else None
        i = 0
        while i < len(modules):
            if self.recompute and recomputable(modules[i:i + 3]):
                pool = _pool_at(modules, i + 3)
                x = recomputed_block(x, *modules[i:i + 3], self.recompute_chunk, pool, budget)
                i += 3 if pool is None else 4
            elif lean_applies(modules[i:i + 2], x, fused_only=self.lean is None):
                # in one chunk unless recomputing: the pair's gradients are written in place, so chunks would
                # only add the membranes kept where they start; a pool after the pair runs inside it, so that the
                # spikes' gradient is the pair's own buffer, not a tensor beside it
                pool = _pool_at(modules, i + 2)
                x = lean_bn_lif(x, *modules[i:i + 2], default_chunk(x.shape[0]) if self.recompute else x.shape[0],
                                pool)
                i += 2 if pool is None else 3
            else:
                x = modules[i](x)
                i += 1
        return x

    def _spliced(self) -> list[nn.Module]:
        """The children, with those of each child :class:`SpikingSequential` run as this one would run them (same
        mode, no hooks) in their place: each layer's input is then let go once the layer has run, where a child's
        would be held by this call until the child returns (a block's input spikes beside its current)."""
        modules = []
        for module in self:
            if (isinstance(module, SpikingSequential) and unhooked(module, SpikingSequential)
                    and (module.training, module.recompute, module.lean, module.recompute_chunk)
                    == (self.training, self.recompute, self.lean, self.recompute_chunk)):
                modules.extend(module._spliced())
            else:
                modules.append(module)
        return modules


def set_recompute(model: nn.Module, enabled: bool = True, chunk: int | None = None) -> int:
    """Switch recomputation on or off (back to the default path) in every :class:`SpikingSequential` of ``model``;
    returns how many conv-BN-LIF blocks it covers. ``chunk``: every block's backward ``chunk`` timesteps at a
    time; None (the default): by samples where the convolution is cheap to run again (:data:`RERUN_FAN_IN`), else
    by chunks of :func:`default_chunk` timesteps."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"recompute chunk: must be at least 1 timestep, got {chunk}")
    blocks = 0
    for module in model.modules():
        if isinstance(module, SpikingSequential):
            module.recompute, module.lean = enabled, (True if enabled else None)
            module.recompute_chunk = chunk
            children = list(module)
            blocks += sum(recomputable(children[i:i + 3]) for i in range(len(children)))
    return blocks
