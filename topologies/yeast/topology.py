"""Yeast: river's bundled gene-function data (2,417 events, 103 features) as a 14-task stream.

Each event is one gene; each of the 14 binary labels ``Class1`` … ``Class14`` is its own task
sharing one trunk. Replayed by ``producer.py``.
"""

from stream_mtl import EventSchema, FeatureSpec, ModelSpec, SamplerSpec, TaskSpec, Topology

FEATURES = [f"Att{i}" for i in range(1, 104)]
LABELS = [f"Class{i}" for i in range(1, 15)]

topology = Topology(
    name="yeast",
    schema=EventSchema(
        id_field="id",
        fields={**{f: "float" for f in FEATURES}, **{label: "bool" for label in LABELS}},
    ),
    features=[FeatureSpec(name="expression", kind="standardize", inputs=FEATURES)],
    tasks=[TaskSpec(name=label.lower(), kind="binary", label=label) for label in LABELS],
    model=ModelSpec(trunk=[256, 256], lr=1e-3),
    sampler=SamplerSpec(kind="proportional"),
    batch_size=16,
    ingest_batch=50,  # small polls learn faster on a short stream (see README: quality)
)
