"""Which weights stay resident under a weight budget, and what each step then streams."""

from __future__ import annotations

from dataclasses import dataclass

from tessera.errors import InvalidRequestError

NUM_BUFFERS = 2  # one layer computes while the next is read; a third only smooths jitter, a resident layer saves reads
STREAMING_MIN_BATCHED_TOKENS = 8192  # see streaming_token_budget


class WeightMemoryError(InvalidRequestError):
    """weight_memory is below what must stay resident."""


@dataclass(frozen=True)
class WeightPlan:
    budget: int
    always_bytes: int  # embeddings, LM head (when not tied), final norm: read every step, never streamed
    layer_bytes: int  # one decoder layer as resident parameters
    region_bytes: int  # one decoder layer as a pack region / stream buffer (aligned)
    num_layers: int
    streamed: tuple[int, ...]  # layer indices streamed from disk, ascending
    num_buffers: int

    @property
    def resident_layers(self) -> int:
        return self.num_layers - len(self.streamed)

    @property
    def resident_bytes(self) -> int:
        """The weight memory this plan holds: always-resident parts, resident layers, stream buffers."""
        buffers = self.num_buffers * self.region_bytes if self.streamed else 0
        return self.always_bytes + self.resident_layers * self.layer_bytes + buffers

    @property
    def streamed_bytes_per_step(self) -> int:
        return len(self.streamed) * self.region_bytes

    def describe(self) -> str:
        if not self.streamed:
            return (f"weight_memory {self.budget / 2**20:.0f} MiB holds every weight "
                    f"({self.resident_bytes / 2**20:.0f} MiB); nothing streams")
        return (f"weight_memory {self.budget / 2**20:.0f} MiB: {self.always_bytes / 2**20:.0f} MiB embeddings/LM "
                f"head/norms + {self.resident_layers} resident layers x {self.layer_bytes / 2**20:.1f} MiB + "
                f"{self.num_buffers} stream buffers x {self.region_bytes / 2**20:.1f} MiB = "
                f"{self.resident_bytes / 2**20:.0f} MiB resident; {len(self.streamed)} of {self.num_layers} layers "
                f"stream from disk ({self.streamed_bytes_per_step / 2**20:.0f} MiB per step)")


def spread(count: int, total: int) -> tuple[int, ...]:
    """`count` of range(total), evenly spaced. Streamed layers interleaved with resident ones keep the reader
    busy while the resident layers compute (streaming them all at the end would leave it idle then)."""
    return tuple(i for i in range(total) if (i + 1) * count // total > i * count // total)


def plan_weights(budget: int, always_bytes: int, layer_bytes: int, region_bytes: int, num_layers: int,
                 num_buffers: int = NUM_BUFFERS) -> WeightPlan:
    if always_bytes + num_layers * layer_bytes <= budget:
        return WeightPlan(budget, always_bytes, layer_bytes, region_bytes, num_layers, (), num_buffers)
    minimum = always_bytes + num_buffers * region_bytes
    if budget < minimum:
        raise WeightMemoryError(
            f"weight_memory={budget} bytes ({budget / 2**20:.1f} MiB) is below the minimum for streaming "
            f"{minimum} bytes ({minimum / 2**20:.1f} MiB): {always_bytes / 2**20:.1f} MiB of embeddings, LM head "
            f"and norms stay resident, plus {num_buffers} layer buffers of {region_bytes / 2**20:.1f} MiB")
    resident = min(num_layers, (budget - minimum) // layer_bytes)
    return WeightPlan(budget, always_bytes, layer_bytes, region_bytes, num_layers,
                      spread(num_layers - resident, num_layers), num_buffers)


def streaming_token_budget(max_num_batched_tokens: int) -> int:
    """Throughput mode: a step costs one pass over the streamed weights whatever its batch, so a prompt
    split over several steps pays several passes. With streaming on, a step takes at least this many
    tokens: waiting prompts are prefilled together in as few passes as the activations allow, and the
    running sequences (up to max_num_seqs) decode together, one weight pass for the whole batch."""
    return max(max_num_batched_tokens, STREAMING_MIN_BATCHED_TOKENS)
