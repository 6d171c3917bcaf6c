"""A site's side of int8 transfer (run config `wire-dtype = "int8"`, `brainjepa.federation.compression`).

The site keeps two things between rounds in Flower's `context.state` (per run, in the site's own
SuperNode; never sent anywhere):
- its copy of the coordinator's downlink reference (`server.downlink`): an int8 delta payload is added
  to it when the reference's checksum is the record's `wire-base`; an fp32 payload is a resync. Either
  way the weights the site trains from must have the record's `weights-checksum`, and become the new
  reference. A delta for a reference this site does not hold is refused (the coordinator then sends the
  fp32 form in the next round).
- its error-feedback residual: what the rounding of its last upload left out, added to the next delta.
A coordinator that resumes starts a new run: both are then empty (the residual's last round is lost,
every site gets the fp32 form once).

Other wire dtypes pass through to the stateless `contract.decode_global` / `encode_update`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from brainjepa.federation.compression import decode_deltas, feedback_step, is_delta_payload, weights_checksum
from brainjepa.federation.contract import ContractError, RoundSpec, decode_global, encode_update

REFERENCE_KEY, RESIDUAL_KEY, META_KEY = "site.wire-reference", "site.wire-residual", "site.wire"


def receive(spec: RoundSpec, payload: Mapping[str, torch.Tensor], state: RecordDict) -> dict[str, torch.Tensor]:
    """The weight sets this site trains from (fp32), kept as its reference under int8."""
    if spec.wire_dtype != "int8" or not payload:
        return decode_global(payload)
    if not spec.weights_checksum:
        raise ContractError("round record: wire-dtype int8 with weights but no weights-checksum")
    if is_delta_payload(payload):
        held = str(state[META_KEY]["checksum"]) if META_KEY in state.config_records else ""
        if not spec.wire_base or held != spec.wire_base:
            raise ContractError(
                f"int8 downlink: the delta applies to reference {spec.wire_base[:16] or 'none'}..., this "
                f"site holds {held[:16] or 'none'}...: it needs the full-precision form (sent next round)"
            )
        base = state[REFERENCE_KEY].to_torch_state_dict()
        try:
            deltas = decode_deltas(payload, {k: v.numel() for k, v in base.items()})
        except ValueError as e:
            raise ContractError(f"int8 downlink: {e}") from e
        received = {k: base[k].float() + deltas[k] for k in base}
    else:
        received = decode_global(payload)
    got = weights_checksum(received)
    if got != spec.weights_checksum:
        raise ContractError(
            f"int8 downlink: the weights to train from have checksum {got[:16]}..., the round record says "
            f"{spec.weights_checksum[:16]}... (corrupted in transit)"
        )
    state[REFERENCE_KEY] = ArrayRecord({k: v.clone() for k, v in received.items()})
    state[META_KEY] = ConfigRecord({"checksum": got})
    return received


def send(
    spec: RoundSpec, trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], state: RecordDict
) -> dict[str, torch.Tensor]:
    """The reply's weight payload; under int8 the delta plus the kept residual, quantised, and the new
    residual kept."""
    if spec.wire_dtype != "int8":
        return encode_update(trained, received, spec.wire_dtype)
    residual = state[RESIDUAL_KEY].to_torch_state_dict() if RESIDUAL_KEY in state.array_records else None
    payload, new_residual = feedback_step({k: trained[k] - received[k] for k in trained}, residual)
    state[RESIDUAL_KEY] = ArrayRecord(new_residual)
    return payload
