"""The worklist and decisions on a real database (SQLite file and PostgreSQL): priority order, every filter
and its counts, claims that expire, "next case", and append-only reviews with versions, retries and
conflicts."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from core import accounts, labels
from core.db import make_engine, make_sessionmaker, transaction
from core.decisions import Answer, ClinicalData, DecisionError, ReviewConflict, report_images, save_review
from core.jobs import VERIFY_REVIEW
from core.migrate import upgrade
from core.tables import (
    AuditEvent,
    Job,
    Report,
    Review,
    ReviewCase,
    ReviewFinding,
    ReviewTag,
    Study,
    User,
    utcnow,
)
from core.worklist import (
    WorklistFilter,
    band_token,
    claim,
    current_reports,
    next_case,
    query_worklist,
    release,
    retag_cases,
    sample_draw,
    tag_ids,
)
from tests.review_rows import add_study

BAND = 0.1


def _users(factory: sessionmaker[Session]) -> tuple[int, int]:
    with transaction(factory) as s:
        a = accounts.create_user(s, username="ann", role="radiologist", password="x" * 12, actor="t")
        b = accounts.create_user(s, username="bob", role="radiologist", password="x" * 12, actor="t")
        s.flush()
        return a.id, b.id


@pytest.fixture
def seeded(factory: sessionmaker[Session]) -> dict[str, str]:
    """Five studies, oldest first: negative, positive, uncertain, not assessable, fundus positive."""
    now = utcnow()
    with transaction(factory) as s:
        studies = {
            "negative": add_study(
                s, models={"pneumonia": {}, "covid19": {}}, received_at=now - timedelta(hours=5)
            ),
            "positive": add_study(
                s,
                models={"pneumonia": {"pneumonia": 0.95, "bacterial_pneumonia": 0.9}, "covid19": {}},
                received_at=now - timedelta(hours=4),
                study_date="20240301",
            ),
            "uncertain": add_study(
                s,
                models={"pneumonia": {"pneumonia": 0.75}, "covid19": {}},
                received_at=now - timedelta(hours=3),
            ),
            "unassessable": add_study(
                s,
                models={"pneumonia": None, "covid19": None},
                received_at=now - timedelta(hours=2),
                modality="CR",
            ),
            "fundus": add_study(
                s,
                models={"glaucoma": {"glaucoma": 0.9}},
                received_at=now - timedelta(hours=1),
                modality="OP",
                study_date="20240601",
            ),
        }
        return {k: v.study_instance_uid for k, v in studies.items()}


def _uids(factory: sessionmaker[Session], f: WorklistFilter) -> list[str]:
    with factory() as s:
        return [r.study_instance_uid for r in query_worklist(s, f, band=BAND).rows]


def test_priority_is_positive_or_uncertain_first_then_oldest(
    factory: sessionmaker[Session], seeded: dict[str, str]
) -> None:
    order = _uids(factory, WorklistFilter())
    names = {v: k for k, v in seeded.items()}
    assert [names[u] for u in order] == ["positive", "uncertain", "fundus", "negative", "unassessable"]
    with factory() as s:
        page = query_worklist(s, WorklistFilter(), band=BAND, limit=2, offset=2)
    assert page.total == 5 and [names[r.study_instance_uid] for r in page.rows] == ["fundus", "negative"]


@pytest.mark.parametrize(
    ("f", "expected"),
    [
        (WorklistFilter(model="glaucoma"), {"fundus"}),
        (WorklistFilter(model="pneumonia"), {"negative", "positive", "uncertain", "unassessable"}),
        (WorklistFilter(finding="bacterial_pneumonia", ai_label="present"), {"positive"}),
        (WorklistFilter(ai_label="present"), {"positive", "fundus"}),
        (WorklistFilter(ai_label="uncertain"), {"uncertain"}),
        (WorklistFilter(model="pneumonia", ai_label="not_assessable"), {"unassessable"}),
        (WorklistFilter(assessable=False), {"unassessable"}),
        (WorklistFilter(modality="OP"), {"fundus"}),
        (WorklistFilter(date_from="20240201", date_to="20240401"), {"positive"}),
        (WorklistFilter(status="reviewed"), set()),
        (
            WorklistFilter(status=None, model="covid19", ai_label="absent"),
            {"negative", "positive", "uncertain"},
        ),
    ],
)
def test_filters(
    factory: sessionmaker[Session], seeded: dict[str, str], f: WorklistFilter, expected: set[str]
) -> None:
    assert set(_uids(factory, f)) == {seeded[n] for n in expected}


def test_counts_per_filter_value_apply_the_other_filters(
    factory: sessionmaker[Session], seeded: dict[str, str]
) -> None:
    with factory() as s:
        counts = query_worklist(s, WorklistFilter(model="pneumonia"), band=BAND).counts
    assert counts["model"] == {"pneumonia": 4, "covid19": 4, "glaucoma": 1}  # the model filter left out
    assert counts["status"] == {"unreviewed": 4}
    assert counts["ai_label"] == {"present": 1, "absent": 3, "uncertain": 1, "not_assessable": 1}
    assert counts["modality"] == {"DX": 3, "CR": 1}
    assert counts["assessable"] == {"yes": 3, "no": 1}
    assert counts["finding"]["bacterial_pneumonia"] == 3


def test_claims_show_expire_and_next_case_skips_them(
    factory: sessionmaker[Session], seeded: dict[str, str]
) -> None:
    ann, bob = _users(factory)
    with transaction(factory) as s:
        first = next_case(s, WorklistFilter(), ann, band=BAND, minutes=10)
    assert first == seeded["positive"]
    with transaction(factory) as s:
        ids = {
            r.study_instance_uid: r
            for r in query_worklist(s, WorklistFilter(status="in_review"), band=BAND).rows
        }
        assert list(ids) == [seeded["positive"]] and ids[seeded["positive"]].claimed_by == "ann"
        # bob cannot take ann's case, and "next" gives him the one after it
        case_id = s.scalar(select(ReviewCase.id).join(ReviewCase.claimed_by).where(User.username == "ann"))
        assert case_id is not None and not claim(s, case_id, bob, minutes=10)
        assert next_case(s, WorklistFilter(), bob, band=BAND, minutes=10) == seeded["uncertain"]
        # ann's own next skips her current case only when told to
        assert next_case(s, WorklistFilter(), ann, band=BAND, minutes=10) == seeded["positive"]
    with transaction(factory) as s:  # expired: anyone may take it
        assert claim(s, case_id, bob, minutes=10, now=utcnow() + timedelta(minutes=11))
    with transaction(factory) as s:
        release(s, case_id, ann)  # not hers any more: no-op
        assert s.get(ReviewCase, case_id).claimed_by_id == bob  # type: ignore[union-attr]
        release(s, case_id, bob)
        assert s.get(ReviewCase, case_id).claimed_by_id is None  # type: ignore[union-attr]


def _report(s: Session, study_uid: str, model: str) -> Report:
    from core.tables import Study

    study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
    return next(r for r in current_reports(s, study.id) if r.model_name == model)


def _save(
    factory: sessionmaker[Session], uid: str, model: str, label: str, base: int, **kw: object
) -> Review:
    with transaction(factory) as s:
        report = _report(s, uid, model)
        user = s.scalars(select(User).where(User.username == kw.pop("user", "ann"))).one()
        answers = [
            Answer(sop_instance_uid=i.sop_instance_uid, label=label, reason=kw.pop("reason", None))
            for i in report_images(s, report)
        ]
        review, _ = save_review(
            s,
            report=report,
            user=user,
            answers=answers,
            base_version=base,
            actor="user:ann",
            **kw,  # type: ignore[arg-type]
        )
        s.flush()
        s.expunge(review)
        return review


def test_reviews_are_versions_retries_are_one_and_conflicts_are_refused(
    factory: sessionmaker[Session], seeded: dict[str, str]
) -> None:
    _users(factory)
    uid = seeded["positive"]
    first = _save(factory, uid, "pneumonia", "bacterial_pneumonia", 0, comment="clear")
    assert first.version == 1 and first.answers[0]["action"] == "confirmed"
    again = _save(factory, uid, "pneumonia", "bacterial_pneumonia", 0, comment="clear")
    assert again.id == first.id  # the same decision sent twice is one review
    with pytest.raises(ReviewConflict, match="version 1 was saved by ann"):
        _save(factory, uid, "pneumonia", "no_pneumonia", 0, user="bob")
    revised = _save(factory, uid, "pneumonia", "viral_pneumonia", 1, user="bob", flagged=True)
    assert revised.version == 2 and revised.answers[0]["action"] == "corrected"
    with factory() as s:
        case = s.scalars(select(ReviewCase).where(ReviewCase.study_id == revised.study_id)).one()
        assert case.status == "unreviewed"  # covid19 is not decided yet
    _save(factory, uid, "covid19", "normal", 0)
    with factory() as s:
        case = s.scalars(select(ReviewCase).where(ReviewCase.study_id == revised.study_id)).one()
        assert case.status == "flagged"
        jobs = s.scalars(select(Job).where(Job.kind == VERIFY_REVIEW)).all()
        assert sorted(j.payload["review_id"] for j in jobs) == sorted(s.scalars(select(Review.id)).all())
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.action.like("decision.%"))).all()
        assert sorted(actions) == ["decision.create", "decision.create", "decision.revise"]
    with factory() as s:
        reviewed = query_worklist(s, WorklistFilter(status="flagged"), band=BAND).rows
        assert [r.study_instance_uid for r in reviewed] == [uid]


@pytest.mark.parametrize(
    ("label", "kw", "error"),
    [
        ("glaucoma", {}, "unknown label 'glaucoma'"),
        (labels.NOT_ASSESSABLE, {}, "say why"),
    ],
)
def test_bad_decisions_are_refused(
    factory: sessionmaker[Session], seeded: dict[str, str], label: str, kw: dict[str, object], error: str
) -> None:
    _users(factory)
    with pytest.raises(DecisionError, match=error):
        _save(factory, seeded["negative"], "pneumonia", label, 0, **kw)
    with factory() as s:
        assert s.scalar(select(Review.id)) is None


def test_not_assessable_with_reason_and_clinical_data(
    factory: sessionmaker[Session], seeded: dict[str, str]
) -> None:
    _users(factory)
    review = _save(
        factory, seeded["unassessable"], "pneumonia", labels.NOT_ASSESSABLE, 0, reason="lateral view"
    )
    assert review.answers[0] == {
        "sop_instance_uid": review.answers[0]["sop_instance_uid"],
        "ai_label": "not_assessable",
        "label": "not_assessable",
        "action": "not assessable",
        "reason": "lateral view",
    }
    clinical = ClinicalData(age=61, sex="F", laterality="R", intraocular_pressure=24.5, cup_to_disc_ratio=0.7)
    review = _save(factory, seeded["fundus"], "glaucoma", "glaucoma", 0, clinical=clinical)
    assert review.clinical == {
        "age": 61,
        "sex": "F",
        "laterality": "R",
        "intraocular_pressure": 24.5,
        "cup_to_disc_ratio": 0.7,
    }
    with pytest.raises(ValueError):
        ClinicalData(cup_to_disc_ratio=1.5)


def test_reviews_are_append_only(factory: sessionmaker[Session], seeded: dict[str, str]) -> None:
    _users(factory)
    _save(factory, seeded["negative"], "pneumonia", "no_pneumonia", 0)
    for statement in ("UPDATE review SET comment = 'changed'", "DELETE FROM review"):
        with pytest.raises(DBAPIError, match="append-only"), transaction(factory) as s:
            s.execute(text(statement))


@pytest.mark.parametrize(
    ("model", "findings", "expected"),
    [
        (
            "pneumonia",
            {"pneumonia": (0.9, True), "bacterial_pneumonia": (0.8, True), "viral_pneumonia": (0.3, False)},
            "bacterial_pneumonia",
        ),
        (
            "pneumonia",
            {"pneumonia": (0.9, True), "bacterial_pneumonia": (0.4, False), "viral_pneumonia": (0.45, False)},
            "viral_pneumonia",
        ),
        (
            "pneumonia",
            {"pneumonia": (0.2, False), "bacterial_pneumonia": (0.1, False), "viral_pneumonia": (0.1, False)},
            "no_pneumonia",
        ),
        ("covid19", {"covid19": (0.1, False), "viral_pneumonia": (0.2, False)}, "normal"),
        ("covid19", {"covid19": (0.7, True), "viral_pneumonia": (0.6, True)}, "covid19"),
        ("glaucoma", {"glaucoma": (0.5, True)}, "glaucoma"),
    ],
)
def test_ai_label(model: str, findings: dict[str, tuple[float, bool]], expected: str) -> None:
    assert labels.ai_label(model, findings) == expected
    meaning = labels.findings_of(model, expected, list(findings))
    assert {f for f, present in meaning.items() if present} <= set(findings)


def test_tags_are_numbers_of_review_tag_tokens(
    factory: sessionmaker[Session], seeded: dict[str, str]
) -> None:
    with factory() as s:
        tokens = dict(s.execute(select(ReviewTag.id, ReviewTag.token)).all())
        case_tags = {
            uid: tags
            for uid, tags in s.execute(
                select(Study.study_instance_uid, ReviewCase.tags).join(
                    ReviewCase, ReviewCase.study_id == Study.id
                )
            )
        }
    positive = {tokens[int(n)] for n in case_tags[seeded["positive"]].strip(",").split(",")}
    expected = {"m=pneumonia", "f=bacterial_pneumonia", "l=present", "m=pneumonia|f=pneumonia|l=present"}
    assert expected <= positive
    assert "m=glaucoma" not in positive
    assert len(case_tags[seeded["positive"]]) < len(",".join(positive)) / 3
    # Adding the same tokens again (a second writer) gives the same numbers and no new rows.
    with transaction(factory) as s:
        again = tag_ids(s, positive | {"m=new"})
        assert again["m=new"] not in tokens and all(again[t] == n for n, t in tokens.items() if t in positive)
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(ReviewTag)) == len(tokens) + 1
    # A token no case has is a filter nobody matches (not an error).
    assert _uids(factory, WorklistFilter(model="nonexistent")) == []


def test_migration_0006_numbers_existing_tags_and_back(database_url: str) -> None:
    from alembic import command

    from core.migrate import alembic_config

    engine = make_engine(database_url)
    upgrade(engine)
    factory = make_sessionmaker(engine)
    with transaction(factory) as s:
        uid = add_study(s, models={"pneumonia": {"pneumonia": 0.95}, "covid19": {}}).study_instance_uid
    cfg = alembic_config(database_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    with engine.connect() as conn:
        old = conn.execute(text("SELECT tags FROM review_case")).scalar_one()
    assert ",m=pneumonia|f=pneumonia|l=present," in old and ",l=absent," in old
    upgrade(engine)
    with factory() as s:
        new = s.execute(select(ReviewCase.tags)).scalar_one()
        assert new.strip(",").replace(",", "").isdigit()
        chosen = WorklistFilter(model="pneumonia", finding="pneumonia", ai_label="present")
        page = query_worklist(s, chosen, band=BAND)
        assert [r.study_instance_uid for r in page.rows] == [uid]
        assert page.counts["model"] == {"pneumonia": 1}  # covid19 has no pneumonia finding
        assert query_worklist(s, WorklistFilter(), band=BAND).counts["model"] == {
            "pneumonia": 1,
            "covid19": 1,
        }
    engine.dispose()


@pytest.mark.parametrize(
    "current",
    [
        WorklistFilter(),
        WorklistFilter(status=None),
        WorklistFilter(model="pneumonia"),
        WorklistFilter(ai_label="uncertain"),
        WorklistFilter(model="pneumonia", ai_label="uncertain"),
        WorklistFilter(finding="pneumonia", ai_label="present", modality="DX"),
        WorklistFilter(status=None, assessable=False),
        WorklistFilter(status=None, date_from="20240201", date_to="20240630"),
    ],
)
def test_every_count_is_what_choosing_that_value_shows(
    factory: sessionmaker[Session], seeded: dict[str, str], current: WorklistFilter
) -> None:
    """Each facet count (one pass, grouped uncertain counts) equals the total of the worklist with that
    value chosen in place of the facet's current one."""
    with factory() as s:
        counts = query_worklist(s, current, band=BAND).counts
        for facet, chosen in counts.items():
            for value, n in chosen.items():
                typed: Any = value
                if facet == "assessable":
                    typed = value == "yes"
                elif facet == "modality":
                    typed = value or None
                total = query_worklist(s, replace(current, **{facet: typed}), band=BAND).total
                assert total == n, (facet, value)
        # and no value with cases is missing
        for model in ("pneumonia", "covid19", "glaucoma"):
            total = query_worklist(s, replace(current, model=model), band=BAND).total
            assert counts["model"].get(model, 0) == total, model
        for status in ("unreviewed", "in_review", "reviewed", "flagged"):
            total = query_worklist(s, replace(current, status=status), band=BAND).total
            assert counts["status"].get(status, 0) == total, status


def _uncertain_by_hand(s: Session, f: WorklistFilter, band: float) -> set[str]:
    """Studies with a finding of ``f``'s model/finding within ``band`` of its threshold, from the findings."""
    rows = s.execute(
        select(
            Study.study_instance_uid, ReviewFinding.model_name, ReviewFinding.finding, ReviewFinding.margin
        )
        .join(ReviewCase, ReviewCase.study_id == Study.id)
        .join(ReviewFinding, ReviewFinding.case_id == ReviewCase.id)
    )
    return {
        uid
        for uid, model, finding, margin in rows
        if margin is not None and margin <= band and f.model in (None, model) and f.finding in (None, finding)
    }


UNCERTAIN_WITH = [
    WorklistFilter(status=None, model="pneumonia", ai_label="uncertain"),
    WorklistFilter(status=None, model="covid19", ai_label="uncertain"),
    WorklistFilter(status=None, finding="pneumonia", ai_label="uncertain"),
    WorklistFilter(status=None, model="pneumonia", finding="viral_pneumonia", ai_label="uncertain"),
]


def test_uncertain_tags_follow_the_band_and_cases_of_another_band_are_still_found(
    factory: sessionmaker[Session],
) -> None:
    """Cases tag which findings are uncertain for the band they were written with. A case written with
    another band (or before the tags said it) is looked at finding by finding, so every filter is right
    before and after retag_cases brings the tags to the configured band."""
    probabilities = [0.72, 0.75, 0.78, 0.85, 0.95, 0.55, 0.45, 0.62]
    with transaction(factory) as s:
        for n, p in enumerate(probabilities):
            add_study(
                s,
                models={
                    "pneumonia": {"pneumonia": p, "viral_pneumonia": p - 0.3},
                    "covid19": {"covid19": p - 0.2},
                },
                band=[0.1, None, 0.3][n % 3],
            )
    for band in (0.1, 0.3):
        with factory() as s:
            for f in UNCERTAIN_WITH:
                expected = _uncertain_by_hand(s, f, band)
                page = query_worklist(s, f, band=band)
                assert {r.study_instance_uid for r in page.rows} == expected, (band, f)
                assert page.total == len(expected)
                counts = query_worklist(s, replace(f, model=None, finding=None), band=band).counts
                if f.finding is None and f.model is not None:
                    assert counts["model"].get(f.model, 0) == len(expected), (band, f)
                if f.model is None and f.finding is not None:
                    assert counts["finding"].get(f.finding, 0) == len(expected), (band, f)
        stale = {0.1: 5, 0.3: 8}[band]  # those written with another band or none (0.3: all, after 0.1)
        with transaction(factory) as s:
            assert retag_cases(s, band, limit=2) == 2  # in batches
        with transaction(factory) as s:
            assert retag_cases(s, band) == stale - 2
            assert retag_cases(s, band) == 0
        with factory() as s:
            token = s.scalars(select(ReviewTag.id).where(ReviewTag.token == band_token(band))).one()
            assert all(f",{token}," in t for t in s.scalars(select(ReviewCase.tags)))
            for f in UNCERTAIN_WITH:
                page = query_worklist(s, f, band=band)
                assert {r.study_instance_uid for r in page.rows} == _uncertain_by_hand(s, f, band), (band, f)


def test_a_random_share_of_negative_cases_is_listed_first_and_marked(factory: sessionmaker[Session]) -> None:
    """Verification sample: an AI-negative case whose draw (by its Study Instance UID) is below the share
    comes first, marked; positive, uncertain and not-assessable cases are never drawn; the mark stays when
    the case is reviewed."""
    share = 0.3
    now = utcnow()
    with transaction(factory) as s:
        negatives = [
            add_study(
                s,
                models={"pneumonia": {}, "covid19": {}},
                received_at=now - timedelta(hours=100 - n),
                sample_share=share,
            ).study_instance_uid
            for n in range(40)
        ]
        others = [
            add_study(s, models={"pneumonia": {"pneumonia": 0.95}, "covid19": {}}, sample_share=1.0),
            add_study(s, models={"pneumonia": {"pneumonia": 0.75}, "covid19": {}}, sample_share=1.0),
            add_study(s, models={"pneumonia": None, "covid19": None}, sample_share=1.0),
        ]
        other_uids = [o.study_instance_uid for o in others]
    drawn = {u for u in negatives if sample_draw(u) < share}
    assert 0 < len(drawn) < len(negatives)  # 40 draws at 0.3: both kinds, for these fixed rules
    with factory() as s:
        page = query_worklist(s, WorklistFilter(), band=BAND, limit=100)
    rows = {r.study_instance_uid: r for r in page.rows}
    assert {u for u, r in rows.items() if r.sampled} == drawn
    assert not any(rows[u].sampled for u in other_uids)
    first = [r.study_instance_uid for r in page.rows if r.priority == 0]
    assert set(first) == drawn | set(other_uids[:2])  # positive, uncertain, and the sample
    assert [r.priority for r in page.rows] == sorted(r.priority for r in page.rows)
    # reviewed (with the share, as the API saves decisions): still marked
    _users(factory)
    uid = sorted(drawn)[0]
    for model, label in (("pneumonia", "no_pneumonia"), ("covid19", "normal")):
        _save(factory, uid, model, label, 0, band=BAND, sample_share=share)
    with factory() as s:
        page = query_worklist(s, WorklistFilter(status="reviewed"), band=BAND)
    assert [(r.study_instance_uid, r.sampled) for r in page.rows] == [(uid, True)]


def test_the_draw_is_fixed_by_the_uid_and_uniform() -> None:
    uids = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(4000)]
    draws = [sample_draw(u) for u in uids]
    assert draws == [sample_draw(u) for u in uids]
    assert all(0.0 <= d < 1.0 for d in draws)
    share = sum(d < 0.05 for d in draws) / len(draws)
    assert 0.04 < share < 0.06  # 4,000 draws: ±1 % is more than 2.9 standard deviations
