"""Active security inside Flower: enrolled nodes, the consistency exchange, and a server that lies (issue 24, 3 and 8)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr", reason='the Flower integration needs pip install -e ".[flower]"')

from flwr.common import Array, ArrayRecord, ConfigRecord  # noqa: E402

from privfer.integrations.flower import RECORD, LocalGrid, SecAggGrid, secagg_mod  # noqa: E402
from privfer.integrations.flower.membership import NodeMembership  # noqa: E402
from privfer.secagg.identity import EnrollmentAuthority, Identity, RosterCertificate  # noqa: E402

from test_flower import SHAPES, expected_average, make_app, run  # noqa: E402

MEMBERS = [11, 23, 35, 47, 59]  # member ids the authority chose: not the server's numbering of the nodes


def enroll(tmp_path, count=5, study="flower-study"):
    """Keys on each node's 'disk', the authority's certificate and its public key (the nodes' pin)."""
    authority = EnrollmentAuthority()
    identities = {}
    for index, member in enumerate(MEMBERS[:count]):
        identity = Identity.generate()
        identity.save(tmp_path / f"node-{index}.key")
        identities[member] = identity
    certificate = authority.certify(study, {m: i.public for m, i in identities.items()})
    (tmp_path / "roster.cert").write_bytes(certificate.to_bytes())
    authority.identity.save(tmp_path / "authority.key")

    def node_config(index: int) -> dict:
        return {"identity-key": str(tmp_path / f"node-{index}.key"), "roster-certificate": str(tmp_path / "roster.cert"),
                "authority-key": str(tmp_path / "authority.key.pub"), "study": study}

    return certificate, node_config


def active_round(tmp_path, grid_class=LocalGrid):
    """One active-security train round of five enrolled nodes over ``grid_class`` (a transport that may lie)."""
    certificate, node_config = enroll(tmp_path)
    grid = grid_class(make_app([secagg_mod]), 5, node_config=node_config)
    secure = SecAggGrid(grid, protect=("train",), certificate=certificate)
    run(secure)
    return secure.reports[0], grid


class TamperingGrid(LocalGrid):
    """The transport of a malicious server: at the masked-input stage (where the nodes train) one node receives
    another model than its peers."""

    def __init__(self, *args, victim_index: int = 0, shift: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.victim, self.shift = self.node_ids[victim_index], shift

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            record = message.content.config_records.get(RECORD)
            if record is not None and record.get("stage") == "masked_input" \
                    and message.metadata.dst_node_id == self.victim:
                arrays = message.content["arrays"]
                message.content["arrays"] = ArrayRecord({k: Array((a.numpy() + self.shift).astype(np.float32))
                                                         for k, a in arrays.items()})
        return super().push_messages(messages)


def test_an_active_round_gives_the_same_average_with_member_ids(tmp_path):
    certificate, node_config = enroll(tmp_path)
    grid = LocalGrid(make_app([secagg_mod]), 5, node_config=node_config)
    secure = SecAggGrid(grid, protect=("train",), certificate=certificate)
    arrays, _ = run(secure)
    expected, _ = expected_average(grid.node_ids)
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k], expected[k], atol=1e-3)
    report = secure.reports[0]
    assert report.aborted is None and sorted(report.included) == grid.node_ids
    assert sorted(report.client_ids.values()) == MEMBERS  # member ids, from the nodes' signed advertisements
    assert report.security == "active" and "consistency" in report.seconds


def test_a_node_given_another_model_makes_the_round_abort(tmp_path):
    """Attack 3: the transport gives one node another model. Its signature is on another statement: the grid's
    server refuses it, and a round whose survivor did not sign releases nothing (the nodes would refuse too —
    tests/test_secagg_active.py forwards the signatures as a lying server would)."""
    report, grid = active_round(tmp_path, TamperingGrid)
    assert report.aborted is not None and "did not sign" in report.aborted and report.included == []
    victim = grid.node_ids[0]
    assert report.dropped[victim].startswith("consistency: InvalidSignature")


def test_the_same_attack_succeeds_against_a_semi_honest_grid(tmp_path):
    """Without the consistency check the round completes over the tampered node's update: the attack is real."""
    tampered = TamperingGrid(make_app([secagg_mod]), 5, shift=1.0)
    lied = SecAggGrid(tampered, protect=("train",), security="semi_honest")
    run(lied)
    assert lied.reports[0].aborted is None and len(lied.reports[0].included) == 5


def test_an_enrolled_node_refuses_a_semi_honest_round(tmp_path):
    """The server cannot downgrade the nodes: their policy comes from their own node config."""
    _, node_config = enroll(tmp_path)
    grid = LocalGrid(make_app([secagg_mod]), 5, node_config=node_config)
    downgraded = SecAggGrid(grid, protect=("train",), security="semi_honest")
    run(downgraded)
    report = downgraded.reports[0]
    assert report.aborted is not None and len(report.dropped) == 5
    assert all("only in rounds with security 'active'" in reason for reason in report.dropped.values())


def test_a_node_without_membership_refuses_an_active_round(tmp_path):
    certificate, _ = enroll(tmp_path)
    grid = LocalGrid(make_app([secagg_mod]), 5)
    secure = SecAggGrid(grid, protect=("train",), certificate=certificate)
    run(secure)
    assert secure.reports[0].aborted is not None
    assert all("no membership" in reason for reason in secure.reports[0].dropped.values())


def test_a_node_pinned_to_another_authority_refuses_the_certificate(tmp_path):
    certificate, node_config = enroll(tmp_path)
    Identity.generate().save(tmp_path / "other.key")

    def pinned_elsewhere(index: int) -> dict:
        return {**node_config(index), "authority-key": str(tmp_path / "other.key.pub")}

    grid = LocalGrid(make_app([secagg_mod]), 5, node_config=pinned_elsewhere)
    secure = SecAggGrid(grid, protect=("train",), certificate=certificate)
    run(secure)
    assert all("not the pinned" in reason for reason in secure.reports[0].dropped.values())


def test_the_grid_requires_a_certificate_for_active_security():
    with pytest.raises(ValueError, match="certificate"):
        SecAggGrid(LocalGrid(make_app([secagg_mod]), 3))


def test_membership_paths_must_be_absolute_and_complete(tmp_path):
    with pytest.raises(ValueError, match="absolute"):
        NodeMembership.from_node_config({"identity-key": "a.key", "roster-certificate": "/c", "authority-key": "/k"})
    with pytest.raises(ValueError, match="roster-certificate"):
        NodeMembership.from_node_config({"identity-key": "/a.key"})
    assert NodeMembership.from_node_config({}) is None
    certificate, node_config = enroll(tmp_path)
    member = NodeMembership.from_node_config(node_config(2))
    assert member.enrollment().member == MEMBERS[2]
    assert isinstance(member.enrollment().certificate, RosterCertificate)


class ConfigTamperingGrid(LocalGrid):
    """Review finding: the same arrays for everyone, but every node except the victim is told lr = 0 — the
    model-inconsistency attack through the config record instead of the weights."""

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            record = message.content.config_records.get(RECORD)
            if record is not None and record.get("stage") == "masked_input" \
                    and message.metadata.dst_node_id != self.node_ids[0]:
                message.content["config"] = ConfigRecord({**dict(message.content["config"]), "lr": 0.0})
        return super().push_messages(messages)


def test_a_node_given_another_config_makes_the_round_abort(tmp_path):
    report, _ = active_round(tmp_path, ConfigTamperingGrid)
    assert report.aborted is not None and report.included == []


class SquattingGrid(LocalGrid):
    """Review finding: node 1000 answers the advertisement first, claiming member 23's id (node 1001's) with a
    signature it cannot make."""

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            if reply.has_error() or reply.metadata.src_node_id != self.node_ids[0]:
                continue
            record = reply.content.config_records.get(RECORD)
            if record is not None and record.get("stage") == "advertise_keys":
                from privfer.secagg import messages as wire

                advert = wire.AdvertiseKeys.from_bytes(record["message"])
                forged = advert.model_copy(update={"sender": MEMBERS[1]})
                reply.content[RECORD] = ConfigRecord({"stage": "advertise_keys", "message": forged.to_bytes()})
        return replies


def test_a_node_cannot_evict_another_by_claiming_its_member_id(tmp_path):
    report, grid = active_round(tmp_path, SquattingGrid)
    squatter, owner = grid.node_ids[0], grid.node_ids[1]
    assert report.dropped[squatter].startswith("advertise_keys: InvalidSignature")
    assert owner in report.included and report.client_ids[owner] == MEMBERS[1]
