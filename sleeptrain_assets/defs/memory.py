"""Night, first half: the hippocampus decides what the model may learn; Memento consolidates what it kept."""

from collections import Counter
from pathlib import Path

import dagster as dg
import numpy as np
from pydantic import Field

from sleeptrain_assets.lib import settings
from sleeptrain_assets.lib.markdown import table
from sleeptrain_assets.lib.hedge import BIASES, HedgePolicy
from sleeptrain_assets.lib.hippocampus import (
    HippocampusRules,
    candidates_from_conversations,
    decide,
    loss_requests,
    summarize,
)
from sleeptrain_assets.lib.memento import MementoPolicy, consolidate
from sleeptrain_assets.lib.memento import summarize as summarize_actions
from sleeptrain_assets.lib.records import CandidateFact, Conversation, Decision, Memory, Person
from sleeptrain_resources.embedding import Embedder
from sleeptrain_resources.llm import BaseModel
from sleeptrain_resources.memory_store import ApplyReport, MemoryStore, StatusChange
from sleeptrain_resources.registry import AdapterRegistry

GROUP = "memory"
HEDGE_STATE = "policy.json"


class HippocampusConfig(dg.Config):
    near_duplicate_threshold: float = Field(0.92, ge=-1.0, le=1.0, description="cosine at which a memory of the "
                                            "same person with the same value is a duplicate (MERGE)")
    contradiction_similarity: float = Field(0.80, ge=-1.0, le=1.0, description="cosine above which a free-text "
                                            "statement worded like a stored one but with another value CORRECTs it")
    nll_scale: float = Field(2.0, gt=0.0, description="teachability = 1 - exp(-answer NLL / nll_scale)")
    min_importance: float = Field(0.5, ge=0.0, le=10.0, description="importance gate (0-10) below which a "
                                  "fact the model already knows is rejected")
    merge_bonus: float = Field(0.5, ge=0.0, le=10.0, description="importance added when a fact is seen again")
    fact_weight: float = Field(1.0, ge=0.0)
    correction_weight: float = Field(1.2, ge=0.0)
    identity_weight: float = Field(0.8, ge=0.0)
    free_text_weight: float = Field(0.9, ge=0.0)
    routing_bias: str = Field("balanced", description=f"initial Hedge bias when no policy state exists: "
                              f"{', '.join(BIASES)}")
    table_rows: int = Field(300, ge=1, description="decisions shown in the UI table")

    def rules(self) -> HippocampusRules:
        return HippocampusRules(
            near_duplicate_threshold=self.near_duplicate_threshold,
            contradiction_similarity=self.contradiction_similarity,
            nll_scale=self.nll_scale,
            min_importance=self.min_importance,
            merge_bonus=self.merge_bonus,
            category_weights={"fact": self.fact_weight, "correction": self.correction_weight,
                              "identity": self.identity_weight, "free_text": self.free_text_weight},
        )


class ConsolidationConfig(dg.Config):
    promote_threshold: float = Field(7.0, ge=0.0, le=10.0, description="importance at which a memory is promoted")
    evict_threshold: float = Field(1.0, ge=0.0, le=10.0, description="importance below which a memory is evicted")
    merge_similarity_threshold: float = Field(0.92, ge=-1.0, le=1.0, description="cosine at which two memories "
                                              "of a person with the same value merge")


def _per_person_table(counts: dict[str, int], people: dict[str, Person] | None = None) -> str:
    people = people or {}
    rows = [[pid, people[pid].name if pid in people else "", n] for pid, n in counts.items()]
    return table(["person", "name", "active memories"], rows) if rows else "_no memories_"


def apply_hippocampus(
    context: dg.AssetExecutionContext,
    config: HippocampusConfig,
    candidates: list[CandidateFact],
    conversations: list[Conversation],
    profiles: dict[str, Person],
    memory_store: MemoryStore,
    embedder: Embedder,
    base_model: BaseModel,
    adapter: Path | None,
) -> tuple[list[Decision], ApplyReport, dict[str, float], str]:
    """Decide on every candidate (answer NLL on `adapter`, Hedge routing, stored memories) and apply atomically.

    Returns the decisions, the store's report, the routing probabilities used and what the losses were scored on.
    """
    memory_store.check_embedding(embedder.model_id, embedder.dim)
    requests = loss_requests(candidates, conversations, profiles)
    keys = sorted(requests)
    nll = base_model.answer_nll([requests[k] for k in keys], adapter=adapter) if keys else []
    losses = dict(zip(keys, nll))
    scored_on = f"{base_model.model_id}" + (f" + adapter {adapter}" if adapter else " (base)")
    context.log.info(f"{len(candidates)} candidates; answer NLL of {len(keys)} facts on {scored_on}")

    texts = sorted({c.text for c in candidates})
    vectors = dict(zip(texts, embedder.embed(texts)))
    stored = [m for pid in sorted({c.person_id for c in candidates}) for m in memory_store.by_person(pid)]
    hedge = HedgePolicy.load_or_create(settings.state_subdir("hedge") / HEDGE_STATE, bias=config.routing_bias)
    routing = hedge.probabilities()
    candidate_vectors = (np.stack([vectors[c.text] for c in candidates]) if candidates
                         else np.zeros((0, embedder.dim), dtype=np.float32))
    decisions = decide(candidates, profiles, stored, candidate_vectors, losses, config.rules(), routing)

    # CORRECTs to a profile value carry an edited sentence: embed what each decision will store.
    missing = sorted({d.candidate.text for d in decisions} - vectors.keys())
    vectors.update(zip(missing, embedder.embed(missing)))
    decision_vectors = (np.stack([vectors[d.candidate.text] for d in decisions]) if decisions
                        else np.zeros((0, embedder.dim), dtype=np.float32))
    return decisions, memory_store.apply(decisions, decision_vectors), routing, scored_on


@dg.asset(group_name=GROUP)
def hippocampus_memories(
    context: dg.AssetExecutionContext,
    config: HippocampusConfig,
    validated_queue: list[Conversation],
    people_profiles: dict[str, Person],
    memory_store: MemoryStore,
    embedder: Embedder,
    base_model: BaseModel,
    registry: AdapterRegistry,
) -> dg.Output[list[Decision]]:
    """A STORE, REJECT, CORRECT or MERGE decision with its reason for every candidate fact, applied atomically."""
    candidates = candidates_from_conversations(validated_queue, people_profiles)
    decisions, report, routing, scored_on = apply_hippocampus(
        context, config, candidates, validated_queue, people_profiles, memory_store, embedder, base_model,
        registry.current_path())

    counts = summarize(decisions)
    per_person = memory_store.count_by_person()
    rows = [[d.action, d.candidate.person_id, d.candidate.slot, d.candidate.value, f"{d.importance:.2f}",
             d.scores.get("nll", ""), d.reason] for d in decisions[: config.table_rows]]
    context.log.info(f"decisions {counts}; store {report.to_dict()}")
    return dg.Output(
        decisions,
        metadata={
            "candidates": len(candidates),
            "decisions": dg.MetadataValue.json(counts),
            "store_operations": dg.MetadataValue.json(report.operations),
            "decision_table": dg.MetadataValue.md(
                table(["action", "person", "slot", "value", "importance", "nll", "reason"], rows)
                + (f"\n\n_{len(decisions) - config.table_rows} more in the operation log_"
                   if len(decisions) > config.table_rows else "")
            ),
            "memories_per_person": dg.MetadataValue.md(_per_person_table(per_person, people_profiles)),
            "active_memories": memory_store.count(),
            "mean_importance": float(np.mean([d.importance for d in decisions])) if decisions else 0.0,
            "scored_on": scored_on,
            "routing": dg.MetadataValue.json({k: round(v, 4) for k, v in routing.items()}),
            "store": memory_store.describe(),
        },
    )


@dg.asset(group_name=GROUP, ins={"hippocampus_memories": dg.AssetIn()})
def consolidated_memories(
    context: dg.AssetExecutionContext,
    config: ConsolidationConfig,
    hippocampus_memories: list[Decision],
    memory_store: MemoryStore,
) -> dg.Output[list[Memory]]:
    """Active memories after Memento consolidation: duplicates merged, weak evicted, strong promoted, all logged."""
    policy = MementoPolicy(config.promote_threshold, config.evict_threshold, config.merge_similarity_threshold)
    actions = consolidate(memory_store.active_memories(), policy, promoted=memory_store.promoted_ids())
    report = memory_store.apply_status_changes(
        [StatusChange(a.op, a.memory_id, a.reason, a.into) for a in actions]
    )
    # The day's writes skipped the vector index to commit fast; consolidation is when it catches up.
    folded = memory_store.index_pending()
    memories = memory_store.active_memories()
    counts = summarize_actions(actions)
    context.log.info(f"consolidation {counts}; {len(memories)} active memories")
    per_person = dict(sorted(Counter(m.person_id for m in memories).items()))
    return dg.Output(
        memories,
        metadata={
            "actions": dg.MetadataValue.json(counts),
            "rows_indexed": folded,
            "store_operations": dg.MetadataValue.json(report.operations),
            "action_table": dg.MetadataValue.md(
                table(["op", "person", "memory", "into", "reason"],
                       [[a.op, a.person_id, a.memory_id, a.into or "", a.reason] for a in actions])
                if actions else "_nothing to consolidate_"
            ),
            "active_memories": len(memories),
            "promoted_memories": len(memory_store.promoted_ids()),
            "memories_per_person": dg.MetadataValue.md(_per_person_table(per_person)),
            "decisions_in": len(hippocampus_memories),
            "store": memory_store.describe(),
        },
    )
