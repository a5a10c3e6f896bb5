"""`kdcache.students`: every student spec builds (or is refused in one line) and saves as a loadable teacher."""

from __future__ import annotations

import json

import pytest
import torch

from kdcache.errors import KDCacheError
from kdcache.models.students import Student, build_student, save_student
from kdcache.models.teachers import MODEL_DIR_FILE, load_teacher
from teachers_for_tests import make_tiny_bert, make_tiny_encoder

TINY_BERT = {
    "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 64,
}


@pytest.fixture(scope="module", autouse=True)
def _import_transformers_models():
    """Pay transformers' one-off import of its model classes (seconds) once, outside any single test."""
    from transformers import BertForSequenceClassification, BertModel  # noqa: F401


def _write_config(path, **extra):
    path.write_text(json.dumps({**TINY_BERT, **extra}))
    return path


def _text_input(tokenizer):
    enc = tokenizer(["this film was very good", "the worst movie of all"], padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items()}


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- Hugging Face config files --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_labels", [1, 2, 5])
def test_config_file_builds_a_bert_with_the_requested_width(tmp_path, tiny_tokenizer, num_labels):
    config = _write_config(tmp_path / "student.json", num_labels=7, architectures=["BertForMaskedLM"])
    student = build_student(str(config), num_labels, tokenizer=tiny_tokenizer)
    assert isinstance(student, Student) and student.is_huggingface and student.source == "huggingface"
    model = student.model
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == num_labels
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert model.config.vocab_size == len(tiny_tokenizer)  # taken from the tokenizer when the config has none
    model.eval()
    logits = student(_text_input(tiny_tokenizer))
    assert logits.shape == (2, num_labels)
    assert student.parameters_count() == sum(p.numel() for p in model.parameters()) > 0


def test_config_file_keeps_its_own_vocab_size_when_large_enough(tmp_path, tiny_tokenizer):
    config = _write_config(tmp_path / "s.json", vocab_size=len(tiny_tokenizer) + 10)
    student = build_student(str(config), 2, tokenizer=tiny_tokenizer)
    assert student.model.config.vocab_size == len(tiny_tokenizer) + 10


def test_config_file_with_a_smaller_vocabulary_than_the_tokenizer_is_refused(tmp_path, tiny_tokenizer):
    config = _write_config(tmp_path / "s.json", vocab_size=len(tiny_tokenizer) - 1)
    with pytest.raises(KDCacheError) as excinfo:
        build_student(str(config), 2, tokenizer=tiny_tokenizer)
    message = _one_line_error(excinfo)
    assert "vocabulary" in message and str(len(tiny_tokenizer) - 1) in message and str(len(tiny_tokenizer)) in message


@pytest.mark.parametrize("text", ["not json", json.dumps({"hidden_size": 32}), json.dumps([1, 2])])
def test_config_file_without_a_model_type_is_refused(tmp_path, text):
    config = tmp_path / "bad.json"
    config.write_text(text)
    with pytest.raises(KDCacheError) as excinfo:
        build_student(str(config), 2)
    assert str(config) in _one_line_error(excinfo)


def test_config_file_of_an_unknown_model_type_is_refused(tmp_path):
    config = _write_config(tmp_path / "bad.json", model_type="no-such-model-type")
    with pytest.raises(KDCacheError) as excinfo:
        build_student(str(config), 2)
    assert str(config) in _one_line_error(excinfo)


def test_seeded_builds_are_identical_and_seeds_differ(tmp_path, tiny_tokenizer):
    config = _write_config(tmp_path / "s.json")
    a = build_student(str(config), 3, tokenizer=tiny_tokenizer, seed=4)
    torch.manual_seed(12345)  # the global RNG state before the call must not matter
    b = build_student(str(config), 3, tokenizer=tiny_tokenizer, seed=4)
    c = build_student(str(config), 3, tokenizer=tiny_tokenizer, seed=5)
    assert _same_state(a.model, b.model)
    assert not _same_state(a.model, c.model)


def test_seeded_architecture_builds_are_identical():
    a = build_student("mlp", 10, kwargs={"hidden": 16}, seed=1)
    b = build_student("mlp", 10, kwargs={"hidden": 16}, seed=1)
    c = build_student("mlp", 10, kwargs={"hidden": 16}, seed=2)
    assert _same_state(a.model, b.model)
    assert not _same_state(a.model, c.model)


# --- Hugging Face folders -------------------------------------------------------------------------------------


def test_hf_folder_with_the_right_head_is_loaded_as_is(tmp_path, tiny_tokenizer):
    folder = make_tiny_bert(tmp_path / "bert", tiny_tokenizer, num_labels=3, seed=1)
    reference = load_teacher(str(folder))
    student = build_student(str(folder), 3, tokenizer=tiny_tokenizer, seed=9)
    assert student.is_huggingface and student.model.config.num_labels == 3
    assert _same_state(student.model, reference.model)  # the trained head is kept, not re-initialised


def test_hf_folder_whose_head_has_another_width_is_refused(tmp_path, tiny_tokenizer):
    folder = make_tiny_bert(tmp_path / "bert", tiny_tokenizer, num_labels=2)
    with pytest.raises(KDCacheError) as excinfo:
        build_student(str(folder), 5, tokenizer=tiny_tokenizer)
    message = _one_line_error(excinfo)
    assert str(folder) in message and "2" in message and "5" in message


def test_bare_encoder_folder_gets_a_fresh_head_and_keeps_its_encoder(tmp_path, tiny_tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    encoder = BertModel(config)
    folder = tmp_path / "encoder"
    encoder.save_pretrained(str(folder))
    student = build_student(str(folder), 4, tokenizer=tiny_tokenizer)
    model = student.model
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 4
    assert model.classifier.weight.shape == (4, 32)
    saved = encoder.state_dict()
    for name, tensor in model.bert.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)
    model.eval()
    assert student(_text_input(tiny_tokenizer)).shape == (2, 4)


def test_hf_folder_with_a_smaller_vocabulary_than_the_tokenizer_is_refused(tmp_path, tiny_tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    folder = tmp_path / "small-vocab"
    BertForSequenceClassification(config).save_pretrained(str(folder))
    with pytest.raises(KDCacheError) as excinfo:
        build_student(str(folder), 2, tokenizer=tiny_tokenizer)
    assert "vocabulary of 50 tokens" in _one_line_error(excinfo)
    # without a tokenizer (image or feature caches) there is nothing to compare against
    assert build_student(str(folder), 2).model.config.vocab_size == 50


def test_hf_folder_with_a_broken_config_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(KDCacheError) as excinfo:
        build_student(str(folder), 2)
    assert str(folder) in _one_line_error(excinfo)


# --- bad specs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["./no-such-folder", "no/such/folder", "missing.json"])
def test_missing_paths_are_refused(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KDCacheError) as excinfo:
        build_student(spec, 2)
    assert spec in _one_line_error(excinfo)


def test_folder_that_is_no_model_is_refused(tmp_path):
    with pytest.raises(KDCacheError, match="not a model folder"):
        build_student(str(tmp_path), 2)


def test_unknown_architecture_name_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KDCacheError, match="unknown model"):
        build_student("no_such_architecture", 2)


# --- architecture names and kdcache folders -------------------------------------------------------------------


def test_architecture_name_builds_with_kwargs_and_width():
    student = build_student("mlp", 7, kwargs={"hidden": 16, "depth": 1})
    assert student.source == "architecture" and not student.is_huggingface
    assert student.architecture == "mlp" and student.kwargs == {"hidden": 16, "depth": 1}
    assert student(torch.zeros(3, 64)).shape == (3, 7)
    assert student.model[1].out_features == 16


def test_architecture_round_trip_through_save_student_and_load_teacher(tmp_path):
    student = build_student("mlp", 10, kwargs={"hidden": 16}, seed=3)
    names = [f"digit {d}" for d in range(10)]
    folder = save_student(student, tmp_path / "best", num_outputs=10, label_names=names)
    assert (folder / MODEL_DIR_FILE).is_file()
    teacher = load_teacher(str(folder))
    assert teacher.source == "kdcache" and teacher.num_outputs == 10 and teacher.label_names == names
    x = torch.rand(5, 64)
    student.model.eval()
    with torch.no_grad():
        assert torch.equal(teacher(x), student(x))
    assert _same_state(teacher.model, student.model)


def test_kdcache_folder_is_a_student_again_with_its_weights(tmp_path):
    original = build_student("mlp", 10, kwargs={"hidden": 8}, seed=0)
    folder = save_student(original, tmp_path / "m", num_outputs=10, label_names=None)
    again = build_student(str(folder), 10, seed=99)
    assert again.source == "kdcache" and again.architecture == "mlp" and again.kwargs == {"hidden": 8}
    assert _same_state(again.model, original.model)  # loaded, not freshly initialised by seed 99
    with pytest.raises(KDCacheError) as excinfo:
        build_student(str(folder), 3)
    message = _one_line_error(excinfo)
    assert "10 outputs" in message and "3" in message


def test_kdcache_folder_with_unreadable_description_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / MODEL_DIR_FILE).write_text("{}")
    with pytest.raises(KDCacheError, match="unreadable model description"):
        build_student(str(folder), 2)


# --- Hugging Face round trip ----------------------------------------------------------------------------------


def test_hf_round_trip_through_save_student_and_load_teacher(tmp_path, tiny_tokenizer):
    config = _write_config(tmp_path / "s.json")
    student = build_student(str(config), 3, tokenizer=tiny_tokenizer, seed=2)
    folder = save_student(student, tmp_path / "best", num_outputs=3, label_names=["neg", "neu", "pos"],
                          tokenizer=tiny_tokenizer)
    teacher = load_teacher(str(folder))
    assert teacher.source == "huggingface"
    assert teacher.num_outputs == 3 and teacher.label_names == ["neg", "neu", "pos"]
    assert teacher.tokenizer is not None and len(teacher.tokenizer) == len(tiny_tokenizer)
    inputs = _text_input(tiny_tokenizer)
    student.model.eval()
    with torch.no_grad():
        expected = student(inputs)
        assert torch.allclose(teacher(inputs), expected, atol=1e-6)
    # the tokenizer saved beside it encodes the same way
    assert teacher.tokenizer("good film")["input_ids"] == tiny_tokenizer("good film")["input_ids"]
    # and the saved folder is a student again, with the same head
    again = build_student(str(folder), 3, tokenizer=tiny_tokenizer, seed=77)
    assert _same_state(again.model, student.model)


# --- pre-trained, truncated students (--student-layers) -------------------------------------------------------


def _layer_prefix(model_type: str) -> str:
    return "transformer.layer." if model_type == "distilbert" else "encoder.layer."


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_student_layers_keep_the_first_layers_of_a_pretrained_encoder(tmp_path, tiny_tokenizer, model_type):
    from transformers import AutoModel

    folder = make_tiny_encoder(tmp_path / "encoder", tiny_tokenizer, layers=4, model_type=model_type)
    pretrained = AutoModel.from_pretrained(str(folder)).state_dict()
    student = build_student(str(folder), 3, tokenizer=tiny_tokenizer, seed=0, layers=2)
    model = student.model
    assert student.is_huggingface and type(model).__name__.endswith("ForSequenceClassification")
    assert model.config.num_hidden_layers == 2 and model.config.num_labels == 3
    kept = model.base_model.state_dict()
    prefix = _layer_prefix(model_type)
    layers = {k[len(prefix):].split(".")[0] for k in kept if k.startswith(prefix)}
    assert layers == {"0", "1"}
    # every kept weight (embeddings, layers 0 and 1) is the pre-trained folder's, bit for bit
    assert all(torch.equal(t, pretrained[k]) for k, t in kept.items() if k in pretrained)
    assert not [k for k in kept if k not in pretrained and not k.startswith("pooler")]
    # and not the deeper layers': the first two, in order
    w1 = [k for k in kept if k.startswith(f"{prefix}1.attention") and k.endswith("weight")][0]
    assert not torch.equal(kept[w1], pretrained[w1.replace(f"{prefix}1.", f"{prefix}3.")])
    enc = _text_input(tiny_tokenizer)
    if model_type == "distilbert":  # DistilBERT reads no token types
        enc.pop("token_type_ids")
    model.eval()
    assert student(enc).shape == (2, 3)


def test_a_truncated_student_saves_and_loads_back_at_its_depth(tmp_path, tiny_tokenizer):
    folder = make_tiny_encoder(tmp_path / "encoder", tiny_tokenizer, layers=4)
    student = build_student(str(folder), 2, tokenizer=tiny_tokenizer, seed=1, layers=3)
    saved = save_student(student, tmp_path / "best", num_outputs=2, label_names=None, tokenizer=tiny_tokenizer)
    assert json.loads((saved / "config.json").read_text())["num_hidden_layers"] == 3
    teacher = load_teacher(str(saved))  # e.g. cache-teacher --teacher RUN/best: a TAKD assistant
    assert teacher.model.config.num_hidden_layers == 3 and len(teacher.model.bert.encoder.layer) == 3
    assert _same_state(teacher.model, student.model)
    # as a student again (a next hop), without --student-layers: the saved depth
    again = build_student(str(saved), 2, tokenizer=tiny_tokenizer)
    assert len(again.model.bert.encoder.layer) == 3 and _same_state(again.model, student.model)


def test_a_truncated_students_head_is_seeded_and_its_layers_are_not(tmp_path, tiny_tokenizer):
    folder = make_tiny_encoder(tmp_path / "encoder", tiny_tokenizer, layers=4)
    a, b, c = (build_student(str(folder), 2, tokenizer=tiny_tokenizer, seed=s, layers=2) for s in (5, 5, 6))
    assert _same_state(a.model, b.model)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)
    assert _same_state(a.model.bert, c.model.bert)  # the encoder comes from the folder, whatever the seed


@pytest.mark.parametrize("layers, needles", [(0, ["at least 1", "0"]), (-1, ["at least 1", "-1"]),
                                             (5, ["--student-layers 5", "has 4 transformer layers", "1 to 4"])])
def test_student_layers_outside_the_encoders_depth_are_refused(tmp_path, tiny_tokenizer, layers, needles):
    folder = make_tiny_encoder(tmp_path / "encoder", tiny_tokenizer, layers=4)
    with pytest.raises(KDCacheError) as excinfo:
        build_student(str(folder), 2, tokenizer=tiny_tokenizer, layers=layers)
    message = _one_line_error(excinfo)
    assert all(n in message for n in needles), message


@pytest.mark.parametrize("kind, what", [("config", "a config file"), ("architecture", "an architecture name"),
                                        ("kdcache", "a kdcache model folder")])
def test_student_layers_on_a_student_without_pretrained_layers_are_refused(tmp_path, monkeypatch, kind, what):
    monkeypatch.chdir(tmp_path)
    spec = {"config": lambda: str(_write_config(tmp_path / "s.json")), "architecture": lambda: "mlp",
            "kdcache": lambda: str(save_student(build_student("mlp", 2), tmp_path / "m", num_outputs=2,
                                                label_names=None))}[kind]()
    with pytest.raises(KDCacheError) as excinfo:
        build_student(spec, 2, layers=1)
    message = _one_line_error(excinfo)
    assert "--student-layers" in message and "pre-trained Hugging Face model folder" in message
    assert spec in message and what in message


def test_a_model_without_a_layer_list_is_refused_in_one_line(tmp_path, tiny_tokenizer):
    """ALBERT shares one layer group across its depth: there is no list of layers to cut."""
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(vocab_size=len(tiny_tokenizer), embedding_size=16, hidden_size=32, num_hidden_layers=4,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    AlbertModel(config).save_pretrained(str(tmp_path / "albert"))
    with pytest.raises(KDCacheError) as excinfo:
        build_student(str(tmp_path / "albert"), 2, layers=2)
    message = _one_line_error(excinfo)
    assert "--student-layers" in message and "base_model.encoder.layer" in message
