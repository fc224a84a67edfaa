import pytest

from vigu_cli.recipe import RecipeError, available_recipes, dump_recipe, load_recipe


def test_shipped_recipes_load():
    names = available_recipes()
    assert {"world-tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name


def test_wan_recipes_carry_the_real_architectures():
    small, big = load_recipe("wan2.1-t2v-1.3b"), load_recipe("wan2.1-t2v-14b")
    assert (small.model.transformer.num_layers, small.model.transformer.num_attention_heads) == (30, 12)
    assert (big.model.transformer.num_layers, big.model.transformer.num_attention_heads) == (40, 40)
    assert small.model.transformer.ffn_dim == 8960 and big.model.transformer.ffn_dim == 13824
    assert small.text.max_length == 256 and small.model.prompt_max_length == 512


def test_override_is_type_checked_and_applied():
    recipe = load_recipe("world-tiny", ["sampling.steps=7", "flow.lambda_text=2", "sampling.solver=heun",
                                        "sampling.video_eta=0"])
    assert recipe.sampling.steps == 7 and recipe.sampling.solver == "heun"
    with pytest.raises(RecipeError, match="sampling.video_eta is for the euler solver: set sampling.video_eta=0"):
        load_recipe("world-tiny", ["sampling.solver=heun"])  # world-tiny samples with the stochastic step
    assert recipe.flow.lambda_text == 2.0
    assert load_recipe("world-tiny", ["train.recall.learning_rate=3e-4"]).train.recall.learning_rate == 3e-4
    assert load_recipe("world-tiny", ["model.transformer.patch_size=[1,2,2]"]).model.transformer.patch_size == [1, 2, 2]
    # YAML 1.1 reads `no` as false: a choice spelled so is still that choice
    assert load_recipe("world-tiny", ["train.refine.mixed_precision=no"]).train.refine.mixed_precision == "no"


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.stpes=3", "unknown recipe key 'sampling.stpes' in sampling: did you mean 'steps'?"),
        ("sampling.steps=abc", "'sampling.steps' must be int, got str 'abc'"),
        ("sampling.solver=heunn", "did you mean 'heun'?"),
        ("flow.lambda_text=aut", "'flow.lambda_text' must be 'auto' or float"),
        ("smapling.steps=3", "did you mean 'sampling'?"),
        ("sampling.steps.x=3", "'sampling.steps' is a value, not a section"),
        ("sampling.steps", "must look like section.key=value"),
        ("flow.corner_prob=1.5", "'flow.corner_prob' must be between 0 and 1, got 1.5"),
        ("train.refine.cond_dropout=-0.1", "'train.refine.cond_dropout' must be between 0 and 1, got -0.1"),
        ("train.recall.ema_decay=x", "'train.recall.ema_decay' must be float, got str 'x'"),
        # ranges: what would otherwise fail later in torch, or sample garbage, stops here
        ("sampling.shift=0", "'sampling.shift' must be above 0, got 0.0"),
        ("sampling.text_shift=-1", "'sampling.text_shift' must be a float and above 0 or null, got -1"),
        ("sampling.steps=-4", "'sampling.steps' must be at least 1, got -4"),
        ("train.recall.batch_size=0", "'train.recall.batch_size' must be at least 1, got 0"),
        ("train.recall.grad_accum=0", "'train.recall.grad_accum' must be at least 1, got 0"),
        ("train.recall.learning_rate=-1", "'train.recall.learning_rate' must be at least 0, got -1.0"),
        ("train.recall.betas=[0.9, 1.5]", "'train.recall.betas[1]' must be between 0 and 1 (both excluded), got 1.5"),
        ("data.shard_size=0", "'data.shard_size' must be at least 1, got 0"),
        ("sampling.video_eta=2", "'sampling.video_eta' must be between 0 and 1, got 2.0"),
        ("train.dataset=[a, b", "the value of override 'train.dataset' is not valid YAML at line 1, column 6: "
                                "expected ',' or ']', but got '<stream end>'; quote it or fix it"),
    ],
)
def test_bad_overrides_give_one_line(override, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("world-tiny", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_text_video_keys_of_its_own_need_own_attention_and_a_video_that_does_not_read_the_text():
    assert load_recipe("world-tiny", ["text.video_keys=text"]).text.video_keys == "text"
    for other in ("text.attention=shared", "text.video_attends_text=true"):
        with pytest.raises(RecipeError, match="text.video_keys: text needs text.attention: own and"):
            load_recipe("world-tiny", ["text.video_keys=text", other])


def test_unknown_key_in_yaml_names_closest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel:\n  transfomer:\n    num_layers: 2\n")
    with pytest.raises(RecipeError, match="unknown recipe key 'model.transfomer' in model: did you mean 'transformer'"):
        load_recipe(path)


def test_invalid_yaml_is_one_line_naming_where(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  height: 16\nfoo: : :\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value) == (f"recipe {path} is not valid YAML at line 3, column 6: mapping values are not "
                                "allowed here; fix the file")


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match="did you mean 'world-tiny'"):
        load_recipe("world-tiy")


def test_dump_round_trips(tmp_path):
    recipe = load_recipe("world-tiny", ["sampling.steps=9"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe
