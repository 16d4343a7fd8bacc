"""Steering that needs predicted expression, on a model that predicts none (scFoundation: [P] used its encoder
only): contrastive steering with objective='expression' and the alpha sweep both stop with the model's one
message (ScFM.require_expression), which says why and what to do instead."""

import numpy as np
import pytest
from test_scfoundation import GENES, counts_adata, write_ckpt
from test_steer_core import _sae

from sae_fast import load_model
from sae_fast.errors import UserError
from sae_fast.steer import contrast
from sae_fast.steer.de import alpha_sweep


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = load_model("scfoundation", path=write_ckpt(tmp_path_factory.mktemp("sf") / "models.ckpt").parent,
                       genes=GENES)
    adata = counts_adata(8, seed=3)
    adata.obs["cell_type"] = np.repeat(["A", "B"], 4)
    return model, adata, _sae(model.d_model, 64, 8)


WHY = "scfoundation gives no predicted expression here: scFoundation's decoder"


def test_contrast_on_expression_names_the_model_and_the_way_out(setup):
    model, adata, sae = setup
    with pytest.raises(UserError, match=WHY) as e:
        contrast(sae, model, adata, source="A", target="B", label="cell_type", layer=1, features=[1, 2],
                 objective="expression", epochs=1, batch_size=2)
    assert str(e.value).endswith("; use objective='embedding'") and "\n" not in str(e.value)


def test_alpha_sweep_needs_predictions(setup):
    model, adata, sae = setup
    with pytest.raises(UserError, match=WHY) as e:
        alpha_sweep(sae, model, adata, feature=1, alphas=[0.0, 2.0], layer=1, gene_sets={"T": ["G1", "G2"]})
    assert str(e.value).endswith("; an alpha sweep needs predictions") and "\n" not in str(e.value)
