"""What each merge method does, in one paragraph, and how to cite it — the text model cards print.

Summaries are our own words, written from the papers listed in the project's algorithm specification.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    title: str
    summary: str
    bibtex: str
    paper_url: str


_TASK_ARITHMETIC_BIB = """@inproceedings{ilharco2023editing,
  title     = {Editing Models with Task Arithmetic},
  author    = {Ilharco, Gabriel and Ribeiro, Marco Tulio and Wortsman, Mitchell and Gururangan, Suchin and
               Schmidt, Ludwig and Hajishirzi, Hannaneh and Farhadi, Ali},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}"""

_TSV_BIB = """@inproceedings{gargiulo2025tsv,
  title     = {Task Singular Vectors: Reducing Task Interference in Model Merging},
  author    = {Gargiulo, Antonio Andrea and Crisostomi, Donato and Bucarelli, Maria Sofia and Scardapane, Simone and
               Silvestri, Fabrizio and Rodol{\\`a}, Emanuele},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2025}
}"""

_TALL_BIB = """@inproceedings{wang2024localizing,
  title     = {Localizing Task Information for Improved Model Merging and Compression},
  author    = {Wang, Ke and Dimitriadis, Nikolaos and Ortiz-Jim{\\'e}nez, Guillermo and Fleuret, Fran{\\c{c}}ois and
               Frossard, Pascal},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2024}
}"""

_ISO_BIB = """@inproceedings{marczak2025notask,
  title     = {No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces},
  author    = {Marczak, Daniel and Magistri, Simone and Cygert, Sebastian and Twardowski, Bart{\\l}omiej and
               Bagdanov, Andrew D. and van de Weijer, Joost},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2025}
}"""

METHOD_INFO: dict[str, MethodInfo] = {
    "average": MethodInfo(
        title="Weight averaging (model soup)",
        summary=(
            "Every parameter of the merged model is the (optionally weighted) mean of the corresponding parameters "
            "of the fine-tuned models. Models fine-tuned from the same pre-trained checkpoint tend to stay in one "
            "low-loss basin, so their average often keeps most of each model's accuracy while costing a single "
            "model at inference time. With a base model this equals Task Arithmetic with scaling 1/T."
        ),
        bibtex="""@inproceedings{wortsman2022soups,
  title     = {Model Soups: Averaging Weights of Multiple Fine-tuned Models Improves Accuracy without Increasing
               Inference Time},
  author    = {Wortsman, Mitchell and Ilharco, Gabriel and Gadre, Samir Yitzhak and Roelofs, Rebecca and
               Gontijo-Lopes, Raphael and Morcos, Ari S. and Namkoong, Hongseok and Farhadi, Ali and Carmon, Yair and
               Kornblith, Simon and Schmidt, Ludwig},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2022}
}""",
        paper_url="https://arxiv.org/abs/2203.05482",
    ),
    "task_arithmetic": MethodInfo(
        title="Task Arithmetic",
        summary=(
            "Each fine-tuned model is turned into a task vector, its weights minus the pre-trained weights. The task "
            "vectors are summed, scaled by a single coefficient λ, and added back to the pre-trained model, "
            "θ = θ₀ + λ Σ_t τ_t. Adding task vectors transfers several abilities into one model; λ controls how far "
            "the merge moves from the base and is usually chosen on validation data."
        ),
        bibtex=_TASK_ARITHMETIC_BIB,
        paper_url="https://arxiv.org/abs/2212.04089",
    ),
    "ties": MethodInfo(
        title="TIES-Merging",
        summary=(
            "TIES reduces interference between task vectors in three steps: it trims each task vector to its "
            "largest-magnitude entries (the rest are reset to zero), elects a sign for every parameter from the "
            "summed trimmed vectors, and averages only the entries that agree with the elected sign (a disjoint "
            "mean). The result is scaled and added to the pre-trained model."
        ),
        bibtex="""@inproceedings{yadav2023ties,
  title     = {{TIES}-Merging: Resolving Interference When Merging Models},
  author    = {Yadav, Prateek and Tam, Derek and Choshen, Leshem and Raffel, Colin and Bansal, Mohit},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2023}
}""",
        paper_url="https://arxiv.org/abs/2306.01708",
    ),
    "dare": MethodInfo(
        title="DARE (Drop And REscale)",
        summary=(
            "DARE is a preprocessing step for task vectors: it drops each delta parameter at random with "
            "probability p and rescales the survivors by 1/(1 − p), which keeps the expected task vector unchanged. "
            "Fine-tuning deltas are highly redundant, so even large drop rates barely hurt each model while "
            "sparsifying the vectors before they are merged with Task Arithmetic or TIES."
        ),
        bibtex="""@inproceedings{yu2024dare,
  title     = {Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch},
  author    = {Yu, Le and Yu, Bowen and Yu, Haiyang and Huang, Fei and Li, Yongbin},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2024}
}""",
        paper_url="https://arxiv.org/abs/2311.03099",
    ),
    "tsv_m": MethodInfo(
        title="Task Singular Vectors — merging (TSV-M)",
        summary=(
            "For every weight matrix, TSV-M keeps the top 1/T of the singular directions of each task's update, "
            "stacks the kept left and right singular vectors of all tasks, and replaces each stack by its closest "
            "orthonormal matrix before recombining them with the kept singular values. Decorrelating the tasks' "
            "subspaces this way reduces interference; non-matrix parameters are averaged."
        ),
        bibtex=_TSV_BIB,
        paper_url="https://arxiv.org/abs/2412.00081",
    ),
    "tsv_c": MethodInfo(
        title="Task Singular Vectors — compression (TSV-C)",
        summary=(
            "TSV-C stores each task's update of every weight matrix as a low-rank approximation made of its top "
            "1/T singular triplets, so that all T tasks together take about the space of one model's update while "
            "each task can be reconstructed almost losslessly. Non-matrix parameters are kept as they are."
        ),
        bibtex=_TSV_BIB,
        paper_url="https://arxiv.org/abs/2412.00081",
    ),
    "consensus": MethodInfo(
        title="Consensus merging",
        summary=(
            "A per-task TALL mask marks the parameters that are important for that task relative to the multi-task "
            "vector. Consensus merging keeps only the parameters that at least k tasks mark as important, removing "
            "'selfish' weights (useful to one task only) and 'catastrophic' weights (useful to none), then adds the "
            "masked sum of task vectors to the pre-trained model."
        ),
        bibtex=_TALL_BIB,
        paper_url="https://arxiv.org/abs/2405.07813",
    ),
    "tall_masks": MethodInfo(
        title="TALL masks",
        summary=(
            "TALL masks localise each task's information inside a single multi-task vector: the mask of task t "
            "keeps the entries where the task's own vector dominates its distance to the multi-task vector. "
            "Applying a task's binary mask to the shared multi-task vector recovers most of the task's fine-tuned "
            "accuracy, so T tasks are stored as one vector plus T bit masks."
        ),
        bibtex=_TALL_BIB,
        paper_url="https://arxiv.org/abs/2405.07813",
    ),
    "iso_c": MethodInfo(
        title="Isotropic merging in the common subspace (Iso-C)",
        summary=(
            "Iso-C takes the Task Arithmetic sum of the task updates of each weight matrix and flattens its "
            "singular-value spectrum: all singular values are replaced by their mean while the singular vectors are "
            "kept. An isotropic spectrum stops a few dominant directions from drowning out the tasks that live in "
            "weaker ones."
        ),
        bibtex=_ISO_BIB,
        paper_url="https://arxiv.org/abs/2502.04959",
    ),
    "iso_cts": MethodInfo(
        title="Isotropic merging in common and task-specific subspaces (Iso-CTS)",
        summary=(
            "Iso-CTS extends Iso-C: it keeps most of the merged matrix's dimensions for the subspace the tasks "
            "share, fills the remaining dimensions with each task's most important directions that fall outside that "
            "common subspace, orthogonalises the combined bases and gives every direction the same singular value."
        ),
        bibtex=_ISO_BIB,
        paper_url="https://arxiv.org/abs/2502.04959",
    ),
    "lines": MethodInfo(
        title="LiNeS (Layer-increasing Network Scaling)",
        summary=(
            "LiNeS rescales a task vector (or a merged multi-task vector) with a coefficient that grows linearly "
            "with depth: shallow layers, which hold general features, are moved little from the pre-trained model, "
            "and deep layers, which hold task-specific features, keep more of the update. This limits forgetting "
            "and interference without any training."
        ),
        bibtex="""@inproceedings{wang2025lines,
  title     = {{LiNeS}: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging},
  author    = {Wang, Ke and Dimitriadis, Nikolaos and Favero, Alessandro and Ortiz-Jim{\\'e}nez, Guillermo and
               Fleuret, Fran{\\c{c}}ois and Frossard, Pascal},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025}
}""",
        paper_url="https://arxiv.org/abs/2410.17146",
    ),
    "c2m3": MethodInfo(
        title="C2M3 (Cycle-Consistent Multi-Model Merging)",
        summary=(
            "C2M3 aligns the hidden units of several independently trained models before averaging them. Each "
            "model gets one permutation per layer into a shared 'universe' space, so the map between any two models "
            "is a composition through the universe and all maps are cycle-consistent by construction. The "
            "permutations are optimised jointly with Frank–Wolfe; the aligned models are averaged and their "
            "activation statistics repaired."
        ),
        bibtex="""@inproceedings{crisostomi2024c2m3,
  title     = {{C$^2$M$^3$}: Cycle-Consistent Multi-Model Merging},
  author    = {Crisostomi, Donato and Fumero, Marco and Baieri, Daniele and Bernard, Florian and
               Rodol{\\`a}, Emanuele},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2024}
}""",
        paper_url="https://arxiv.org/abs/2405.17897",
    ),
    "weight_matching": MethodInfo(
        title="Weight matching (Git Re-Basin)",
        summary=(
            "Networks are equivalent up to permutations of their hidden units. Weight matching finds, layer by "
            "layer, the permutation of one model's units that best aligns its weights with a reference model "
            "(coordinate ascent over linear assignment problems); once aligned, the two models can be averaged with "
            "far less loss than naive averaging."
        ),
        bibtex="""@inproceedings{ainsworth2023rebasin,
  title     = {Git Re-Basin: Merging Models modulo Permutation Symmetries},
  author    = {Ainsworth, Samuel K. and Hayase, Jonathan and Srinivasa, Siddhartha},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}""",
        paper_url="https://arxiv.org/abs/2209.04836",
    ),
    "atm": MethodInfo(
        title="ATM (Alternating Tuning and Merging)",
        summary=(
            "ATM treats merging as one step of an iterative procedure: in every round each task fine-tunes a copy "
            "of the current merged model for a small budget, the resulting task vectors (relative to the current "
            "model) are merged, and the merge becomes the next round's starting point. Since a task vector after "
            "one full-batch gradient step is the negative task gradient, ATM approximates multi-task training "
            "without pooling the tasks' data."
        ),
        bibtex="""@article{zhou2024atm,
  title   = {{ATM}: Improving Model Merging by Alternating Tuning and Merging},
  author  = {Zhou, Luca and Solombrino, Daniele and Crisostomi, Donato and Bucarelli, Maria Sofia and
             Silvestri, Fabrizio and Rodol{\\`a}, Emanuele},
  journal = {arXiv preprint arXiv:2411.03055},
  year    = {2024}
}""",
        paper_url="https://arxiv.org/abs/2411.03055",
    ),
}
