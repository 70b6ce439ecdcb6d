"""The codon losses (llm/model/codon_losses.py): the codon tree, hierarchical cross-entropy and soft labels, checked
against brute-force computations written here from the definitions, on a tree of nested tuples built here."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from llm.config import ConfigError
from llm.genetic_code import STANDARD_CODE, STOP_CODONS, kmers
from llm.model.codon_losses import CodonTree, HXELoss, SoftLabelLoss, codon_token_names

TOKENS = codon_token_names()
TREE = CodonTree(TOKENS)
V = 70
SPECIALS = ("pad", "cls", "eos", "unk", "mask", "distill_token")
AMINO_ACIDS = "VADEGFLSYCWPHQRITNK"  # HELM's children of aa_codons


def nested_tree() -> tuple:
    """The codon tree as (label, children) pairs with token strings as leaves."""
    def codons_of(amino_acid: str) -> list[str]:
        return [codon for codon in kmers(3) if STANDARD_CODE[codon] == amino_acid]
    aa_codons = ("aa_codons", [(aa, codons_of(aa)) for aa in AMINO_ACIDS])
    codons = ("codons", [("start_codon", ["ATG"]), aa_codons, ("end_codon", ["TAA", "TAG", "TGA"])])
    return "all", [codons] + [(special, [f"<{special}>"]) for special in SPECIALS]


def tree_positions(tree, prefix: tuple = ()):
    """(position, subtree) for every position of the tree, a position being the child indices from the root."""
    yield prefix, tree
    if isinstance(tree, tuple):
        for i, child in enumerate(tree[1]):
            yield from tree_positions(child, prefix + (i,))


POSITIONS = dict(tree_positions(nested_tree()))  # position -> subtree (a str for a leaf)
LEAF_POSITION = {subtree: position for position, subtree in POSITIONS.items() if isinstance(subtree, str)}


def under(position: tuple) -> list[tuple]:
    """The positions in the subtree at `position`, itself included."""
    return [p for p in POSITIONS if p[:len(position)] == position]


def brute_hxe(probs: list[float], target: int, alpha: float) -> float:
    """Hierarchical cross-entropy of one target, walking its path with sums of leaf probabilities."""
    def prob(position: tuple) -> float:
        return sum(probs[TOKENS.index(POSITIONS[p])] for p in under(position) if isinstance(POSITIONS[p], str))
    total_weight = sum(math.exp(-alpha * len(p)) for p in POSITIONS)
    leaf = LEAF_POSITION[TOKENS[target]]
    loss = 0.0
    for depth in range(len(leaf), 0, -1):
        weight = math.exp(-alpha * depth) / total_weight
        loss += weight * (-math.log(prob(leaf[:depth])) + math.log(prob(leaf[:depth - 1])))
    return loss


@functools.cache
def height(position: tuple) -> int:
    return max(len(p) - len(position) for p in under(position))


def brute_distance(a: int, b: int) -> int:
    """Height of the lowest common ancestor of tokens a and b, 0 for a == b."""
    if a == b:
        return 0
    position_a, position_b = LEAF_POSITION[TOKENS[a]], LEAF_POSITION[TOKENS[b]]
    common = 0
    while position_a[common] == position_b[common]:
        common += 1
    return height(position_a[:common])


def brute_kl(probs: list[float], target: int, beta: float) -> float:
    distances = [brute_distance(leaf, target) for leaf in range(V)]
    largest = max(brute_distance(a, b) for a in range(V) for b in range(V))
    unnormalised = [math.exp(-beta * d / largest) for d in distances]
    q = [u / sum(unnormalised) for u in unnormalised]
    return sum(q_i * (math.log(q_i) - math.log(p_i)) for q_i, p_i in zip(q, probs))


def node(name: str) -> int:
    return TREE.nodes.index(name)


def leaf_node(token: str) -> int:
    return TREE.num_internal + TOKENS.index(token)


def test_token_names_follow_the_vocabulary_layout():
    assert len(TOKENS) == V and TOKENS[:4] == ["<cls>", "<pad>", "<eos>", "<unk>"]
    assert TOKENS[4:6] == ["AAA", "AAT"] and TOKENS[67] == "GGG" and TOKENS[68:] == ["<mask>", "<distill_token>"]


def test_tree_structure():
    assert TREE.leaves == TOKENS and len(TREE.nodes) == len(POSITIONS) == 100
    amino_acids = [TREE.nodes[n] for n, parent in enumerate(TREE.parents) if parent == node("aa_codons")]
    assert sorted(amino_acids) == sorted(AMINO_ACIDS)
    for codon in kmers(3):
        path = [TREE.nodes[n] for n in TREE.path(leaf_node(codon))]
        if codon == "ATG":
            assert path == ["ATG", "start_codon", "codons", "all"]
        elif codon in STOP_CODONS:
            assert path == [codon, "end_codon", "codons", "all"]
        else:
            assert path == [codon, STANDARD_CODE[codon], "aa_codons", "codons", "all"]
        assert TREE.depths[leaf_node(codon)] == len(path) - 1
    for special in SPECIALS:
        assert [TREE.nodes[n] for n in TREE.path(leaf_node(f"<{special}>"))] == [f"<{special}>", special, "all"]
        assert TREE.depths[leaf_node(f"<{special}>")] == 2
    assert TREE.heights[node("all")] == 4 and TREE.heights[node("V")] == 1 and TREE.heights[leaf_node("GTT")] == 0
    assert TREE.membership.shape == (30, V) and TREE.membership[node("V")].sum() == 4
    assert TREE.membership[node("all")].all() and TREE.membership[node("aa_codons")].sum() == 60


def test_tokens_must_be_the_leaves():
    with pytest.raises(ValueError, match="missing"):
        CodonTree(TOKENS[:-1])
    with pytest.raises(ValueError, match="each once"):
        CodonTree(TOKENS + ["AAA"])


@pytest.mark.parametrize("alpha", [0.2, 0.6])
def test_hxe_matches_brute_force(alpha):
    loss = HXELoss(TREE, alpha)
    logits = 3 * torch.randn(V, V)
    probs = logits.double().softmax(-1).tolist()
    for target in range(V):
        got = loss(logits[target:target + 1], torch.tensor([target])).item()
        assert got == pytest.approx(brute_hxe(probs[target], target, alpha), abs=1e-5)


def test_hxe_maps_tokens_by_name():
    order = torch.randperm(V)
    permuted = HXELoss(CodonTree([TOKENS[i] for i in order]), 0.2)
    logits, targets = torch.randn(16, V), torch.randint(0, V, (16,))
    inverse = torch.argsort(order)
    expected = HXELoss(TREE, 0.2)(logits, targets)
    torch.testing.assert_close(permuted(logits[:, order], inverse[targets]), expected)


def test_hxe_large_alpha_keeps_the_top_edge():
    """The weights fall with depth, so a large alpha leaves w(depth 1) * -log P(child of the root on the path)."""
    alpha = 20.0
    top_weight = math.exp(-alpha) / sum(math.exp(-alpha * len(p)) for p in POSITIONS)
    logits = torch.randn(V, V)
    probs = logits.double().softmax(-1)
    codon_mass = probs[:, 4:68].sum(-1)
    for target in range(V):
        got = HXELoss(TREE, alpha)(logits[target:target + 1], torch.tensor([target])).item()
        top_mass = codon_mass[target] if 4 <= target < 68 else probs[target, target]
        assert got / top_weight == pytest.approx(-math.log(top_mass), rel=1e-4)


def test_hxe_uniform_logits_by_hand():
    """GTT with P(leaf) = 1/70: the edges into GTT, V (4 leaves), aa_codons (60) and codons (64) give
    log 4, log(60/4), log(64/60) and log(70/64); positions per depth 0..4: 1, 7, 9, 23, 60."""
    alpha = 0.2
    total_weight = sum(n * math.exp(-alpha * d) for d, n in enumerate([1, 7, 9, 23, 60]))
    terms = [(4, math.log(4)), (3, math.log(60 / 4)), (2, math.log(64 / 60)), (1, math.log(70 / 64))]
    expected = sum(math.exp(-alpha * depth) * term for depth, term in terms) / total_weight
    got = HXELoss(TREE, alpha)(torch.zeros(1, V), torch.tensor([TOKENS.index("GTT")])).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_hxe_alpha_zero_is_cross_entropy_over_the_positions():
    """With equal weights 1/100 the path sum of -log(P(n) / P(parent)) telescopes to -log P(leaf)."""
    logits, targets = 2 * torch.randn(200, V), torch.randint(0, V, (200,))
    got = HXELoss(TREE, 0.0)(logits, targets) * len(POSITIONS)
    torch.testing.assert_close(got, F.cross_entropy(logits, targets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [15.0, 3.0])
def test_soft_labels_match_brute_force(beta):
    loss = SoftLabelLoss(TREE, beta)
    logits = 3 * torch.randn(V, V)
    probs = logits.double().softmax(-1).tolist()
    for target in range(V):
        got = loss(logits[target:target + 1], torch.tensor([target])).item()
        assert got == pytest.approx(brute_kl(probs[target], target, beta), abs=1e-5)


def test_leaf_distances_match_brute_force():
    expected = torch.tensor([[brute_distance(a, b) for b in range(V)] for a in range(V)], dtype=torch.float64)
    torch.testing.assert_close(TREE.leaf_distances(), expected)


def test_soft_labels_favour_near_leaves():
    labels = SoftLabelLoss(TREE, 15.0).soft_labels
    gtt, gtc, gct, pad = (TOKENS.index(token) for token in ("GTT", "GTC", "GCT", "<pad>"))
    assert labels[gtt, gtc] > labels[gtt, gct] > labels[gtt, pad]
    torch.testing.assert_close(labels.sum(-1), torch.ones(V))
    off_diagonal = labels.masked_fill(torch.eye(V, dtype=torch.bool), 0)
    assert (labels.diagonal()[:, None] > off_diagonal).all()


def test_soft_labels_large_beta_is_cross_entropy():
    logits, targets = 2 * torch.randn(100, V), torch.randint(0, V, (100,))
    got = SoftLabelLoss(TREE, 1000.0)(logits, targets)
    torch.testing.assert_close(got, F.cross_entropy(logits, targets), rtol=1e-5, atol=1e-5)


LOSSES = [pytest.param(lambda: HXELoss(TREE, 0.2), id="hxe"),
          pytest.param(lambda: SoftLabelLoss(TREE, 15.0), id="soft")]


@pytest.mark.parametrize("make_loss", LOSSES)
def test_ignored_targets_contribute_nothing(make_loss):
    loss = make_loss()
    logits, targets = torch.randn(2, 8, V, requires_grad=True), torch.randint(0, V, (2, 8))
    ignored = torch.rand(2, 8) < 0.4
    ignored[0, 0], ignored[0, 1] = True, False
    value = loss(logits, targets.masked_fill(ignored, -1))
    torch.testing.assert_close(value, loss(logits[~ignored], targets[~ignored]))
    value.backward()
    assert (logits.grad[ignored] == 0).all() and (logits.grad[~ignored] != 0).any(-1).all()


@pytest.mark.parametrize("make_loss", LOSSES)
def test_all_ignored_is_zero_with_zero_gradients(make_loss):
    logits = torch.randn(5, V, requires_grad=True)
    value = make_loss()(logits, torch.full((5,), -1))
    value.backward()
    assert value.item() == 0 and torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


@pytest.mark.parametrize("make_loss", LOSSES)
def test_gradients_flow_to_the_logits(make_loss):
    logits = torch.randn(12, V, requires_grad=True)
    make_loss()(logits, torch.randint(0, V, (12,))).backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad != 0).any(-1).all()


@pytest.mark.parametrize("make_loss", LOSSES)
def test_bf16_logits(make_loss):
    loss = make_loss()
    logits, targets = torch.randn(12, V).bfloat16().requires_grad_(), torch.randint(0, V, (12,))
    value = loss(logits, targets)
    value.backward()
    assert value.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, loss(logits.detach().float(), targets))
    assert torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("make_loss, flag", [(lambda: HXELoss(TREE, -0.1), "--hxe_alpha"),
                                             (lambda: HXELoss(TREE, math.nan), "--hxe_alpha"),
                                             (lambda: SoftLabelLoss(TREE, 0.0), "--soft_label_beta"),
                                             (lambda: SoftLabelLoss(TREE, math.inf), "--soft_label_beta")])
def test_bad_settings_are_config_errors(make_loss, flag):
    with pytest.raises(ConfigError, match=flag):
        make_loss()


def test_wrong_number_of_classes_refused():
    with pytest.raises(ValueError, match="71 classes"):
        HXELoss(TREE, 0.2)(torch.randn(3, 71), torch.zeros(3, dtype=torch.long))
