"""Losses that know the genetic code: hierarchical cross-entropy (`--loss hxe`) and soft labels
(`--loss soft_labels`) over the codon tree of HELM, following "Making Better Mistakes" (Bertinetto et al., 2020).

The tree, built from `genetic_code.STANDARD_CODE`, has the 3-mer vocabulary as its leaves:

    all
    ├── codons
    │   ├── start_codon: ATG
    │   ├── aa_codons: one node per amino acid other than M (19), each with its synonymous codons
    │   └── end_codon: TAA, TAG, TGA
    └── pad, cls, eos, unk, mask, distill_token: each with its token as only leaf

so codons sit at depth 4, ATG and the stop codons at depth 3 and the special tokens at depth 2.

Hierarchical cross-entropy weighs the edge into a node at depth d by exp(-alpha * d), divided by the sum of
exp(-alpha * depth) over every position of the tree (root and leaves included), as HELM's weights are: the weights
fall with the depth, so a large alpha leaves mostly the top edge, -log P(child of the root), and alpha = 0 gives
the flat cross-entropy divided by the number of positions.

Soft labels take the distance of two leaves as the height of their lowest common ancestor, 0 for a leaf and
itself. HELM's own code gives a leaf and itself the largest distance instead (its `h_distance` is 0 for equal
labels and the distance is `height - h_distance`); that defect is not copied here.

Targets equal to -1 are ignored; a loss is the mean over the other targets, 0 when there are none.
"""
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import require
from ..genetic_code import STANDARD_CODE, START_CODON, STOP, STOP_CODONS, kmers
from ..targets import IGNORE

SPECIAL_TOKENS = {"pad": "<pad>", "cls": "<cls>", "eos": "<eos>", "unk": "<unk>", "mask": "<mask>",
                  "distill_token": "<distill_token>"}  # tree node -> its token


def codon_token_names() -> list[str]:
    """Token strings of the 3-mer vocabulary by id: <cls> 0, <pad> 1, <eos> 2, <unk> 3, the 64 codons at 4-67 in
    `kmers(3)` order, <mask> 68, <distill_token> 69."""
    return ["<cls>", "<pad>", "<eos>", "<unk>", *kmers(3), "<mask>", "<distill_token>"]


def _children() -> dict[str, list[str]]:
    """Each internal node of the codon tree -> the names of its children, a parent before its children; names
    that are not keys are leaves (token strings)."""
    start_amino_acid = STANDARD_CODE[START_CODON]
    amino_acids = list(dict.fromkeys(aa for aa in STANDARD_CODE.values() if aa not in (start_amino_acid, STOP)))
    children = {"all": ["codons", *SPECIAL_TOKENS], "codons": ["start_codon", "aa_codons", "end_codon"],
                "start_codon": [START_CODON], "aa_codons": amino_acids, "end_codon": list(STOP_CODONS)}
    children.update({aa: [codon for codon in kmers(3) if STANDARD_CODE[codon] == aa] for aa in amino_acids})
    children.update({node: [token] for node, token in SPECIAL_TOKENS.items()})
    return children


class CodonTree:
    """The codon tree with its leaves in token-id order.

    tokens: the token string of each id (`codon_token_names()` for HELM's vocabulary); the tokens must be the
    tree's 70 leaves, each once.

    Nodes are numbered internal nodes first (the root `all` is 0, a parent before its children), then the leaves
    in token-id order: token id i is node `num_internal + i`. `parents[n]` is -1 for the root, `depths[n]` counts
    the edges from the root, `heights[n]` is the longest path from n down to a leaf (0 for a leaf) and
    `membership[n, i]` tells whether internal node n is an ancestor of token i.
    """

    def __init__(self, tokens: Sequence[str]):
        children = _children()
        tree_leaves = {name for kids in children.values() for name in kids if name not in children}
        missing, unknown = sorted(tree_leaves - set(tokens)), sorted(set(tokens) - tree_leaves)
        if missing or unknown or len(set(tokens)) != len(tokens):
            raise ValueError(f"tokens must be the codon tree's {len(tree_leaves)} leaves, each once: "
                             f"missing {missing}, unknown {unknown}, {len(tokens)} tokens given")
        self.leaves = list(tokens)
        self.num_internal = len(children)
        self.nodes = list(children) + self.leaves
        index = {name: n for n, name in enumerate(self.nodes)}
        self.parents = [-1] * len(self.nodes)
        for parent, kids in children.items():
            for kid in kids:
                self.parents[index[kid]] = index[parent]
        self.depths = [len(self.path(n)) - 1 for n in range(len(self.nodes))]
        self.heights = [0] * len(self.nodes)
        for n in reversed(range(1, len(self.nodes))):  # children come after their parents
            parent = self.parents[n]
            self.heights[parent] = max(self.heights[parent], self.heights[n] + 1)
        self.membership = torch.zeros(self.num_internal, len(self.leaves), dtype=torch.bool)  # (I, L)
        for leaf in range(len(self.leaves)):
            for n in self.path(self.num_internal + leaf)[1:]:
                self.membership[n, leaf] = True

    def path(self, node: int) -> list[int]:
        """The nodes from `node` up to the root, both included."""
        path = [node]
        while self.parents[path[-1]] >= 0:
            path.append(self.parents[path[-1]])
        return path

    def leaf_distances(self) -> torch.Tensor:
        """(L, L) float64: the height of the lowest common ancestor of tokens a and b (a leaf itself when a == b,
        so 0)."""
        paths = [self.path(self.num_internal + leaf) for leaf in range(len(self.leaves))]
        distances = torch.zeros(len(paths), len(paths), dtype=torch.float64)  # (L, L)
        for a, path_a in enumerate(paths):
            for b, path_b in enumerate(paths):
                distances[a, b] = self.heights[next(n for n in path_b if n in path_a)]
        return distances


def _flatten(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (..., V) and targets (...) as fp32 (N, V) and (N,), checking V against the tree's leaves."""
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} classes, the codon tree has {vocab_size} leaves")
    return logits.reshape(-1, vocab_size).float(), targets.reshape(-1)


def _mean_over_targets(per_token: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of per_token (N,) over the targets that are not ignored; 0, with zero gradients, when all are."""
    kept = targets != IGNORE  # (N,)
    return torch.where(kept, per_token, 0.0).sum() / kept.sum().clamp(min=1)


class HXELoss(nn.Module):
    """Hierarchical cross-entropy over the codon tree: for target leaf y, the sum over the edges on its path to the
    root of w(n) * (-log P(n) + log P(parent(n))), n the node the edge goes into, P(node) the softmax probability
    of the leaves under it and w(n) = exp(-alpha * depth(n)) / sum of exp(-alpha * depth) over all tree positions.

    forward(logits (..., 70), targets (...)) -> mean loss (); logits of any float dtype, computed in fp32; the
    log-probabilities of the 30 internal nodes take a (N, 30, 70) fp32 tensor for N tokens.
    The tensors are buffers that move with the module and are not saved in its state_dict.
    """

    def __init__(self, tree: CodonTree, alpha: float):
        super().__init__()
        require(math.isfinite(alpha) and alpha >= 0,
                f"--hxe_alpha {alpha}: the decay of the edge weights with depth must be a finite number >= 0; "
                "use e.g. --hxe_alpha 0.2")
        depths = torch.tensor(tree.depths, dtype=torch.float64)  # (I + L,)
        weights = torch.exp(-alpha * depths)  # (I + L,)
        weights = weights / weights.sum()  # (I + L,)
        # loss(y) = -sum_n coefficients[y, n] * log P(n): +w(n) for each node n on the path, -w(n) for its parent
        # (the root's column stays 0)
        coefficients = torch.zeros(len(tree.leaves), len(tree.nodes), dtype=torch.float64)  # (L, I + L)
        for leaf in range(len(tree.leaves)):
            for n in tree.path(tree.num_internal + leaf)[:-1]:
                coefficients[leaf, n] += weights[n]
                if tree.parents[n] != 0:  # log P(root) = 0
                    coefficients[leaf, tree.parents[n]] -= weights[n]
        bias = torch.zeros(tree.membership.shape).masked_fill(~tree.membership, -math.inf)  # (I, L)
        self.register_buffer("coefficients", coefficients.float(), persistent=False)
        self.register_buffer("internal_bias", bias, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = _flatten(logits, targets, self.coefficients.shape[0])
        log_p_leaves = F.log_softmax(logits, dim=-1)  # (N, L)
        log_p_internal = torch.logsumexp(log_p_leaves[:, None, :] + self.internal_bias, dim=-1)  # (N, I)
        log_p_nodes = torch.cat([log_p_internal, log_p_leaves], dim=-1)  # (N, I + L)
        per_token = -(self.coefficients[targets.clamp(min=0)] * log_p_nodes).sum(-1)  # (N,)
        return _mean_over_targets(per_token, targets)


class SoftLabelLoss(nn.Module):
    """Soft-label loss over the codon tree: KL(q_y || softmax(logits)) with the target distribution
    q_y = softmax over the leaves of -beta * d(., y) / d_max, d the leaf distance of `CodonTree.leaf_distances`.

    forward(logits (..., 70), targets (...)) -> mean loss (); logits of any float dtype, computed in fp32.
    `soft_labels[y]` is q_y. The tensors are buffers that move with the module and are not saved in its state_dict.
    """

    def __init__(self, tree: CodonTree, beta: float):
        super().__init__()
        require(math.isfinite(beta) and beta > 0,
                f"--soft_label_beta {beta}: the hardness of the soft labels must be a finite number > 0; "
                "use e.g. --soft_label_beta 15")
        distances = tree.leaf_distances()  # (L, L)
        log_labels = F.log_softmax(-beta * distances / distances.max(), dim=-1)  # (L, L)
        labels = log_labels.exp()  # (L, L)
        self.register_buffer("soft_labels", labels.float(), persistent=False)
        self.register_buffer("neg_entropy", (labels * log_labels).sum(-1).float(), persistent=False)  # (L,)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = _flatten(logits, targets, self.soft_labels.shape[0])
        log_p = F.log_softmax(logits, dim=-1)  # (N, L)
        kept_targets = targets.clamp(min=0)  # (N,)
        per_token = self.neg_entropy[kept_targets] - (self.soft_labels[kept_targets] * log_p).sum(-1)  # (N,)
        return _mean_over_targets(per_token, targets)
