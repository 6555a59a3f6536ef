"""Unit tests of crystalmapping.config: defaults, validation messages, round trips, files."""

import json
import math

import numpy as np
import pytest

from crystalmapping.config import LinkOptions, LocateOptions, ProcessConfig, load_config_file
from crystalmapping.errors import ConfigError, ConfigTypeError, CrystalMappingError


def test_error_classes_are_builtin_subclasses():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, CrystalMappingError)
    assert issubclass(ConfigTypeError, TypeError) and issubclass(ConfigTypeError, CrystalMappingError)


def test_defaults():
    """The tutorial's sizes; the locator, linker and intensity that give correct maps."""
    config = ProcessConfig()
    assert config.locate.diameter == 15
    assert config.locate.percentile == 80
    assert config.locate.separation is None
    assert config.link.search_range == 50
    assert config.link.memory == 0
    assert config.data_key == "dexela_image"
    assert config.background is None
    assert config.intensity_column == "amplitude"
    assert config.locate.locator == "bragg" and config.link.linker == "grid"
    assert config.points_per_chunk == 1


def test_even_diameter_names_value_and_fix():
    with pytest.raises(ConfigError) as info:
        LocateOptions(diameter=14)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "diameter" in message and "14" in message and "odd" in message
    assert "15" in message and "13" in message


def test_whole_float_diameter_becomes_int():
    assert LocateOptions(diameter=11.0).diameter == 11
    assert type(LocateOptions(diameter=11.0).diameter) is int


def test_fractional_diameter_raises():
    with pytest.raises(ConfigError, match=r"diameter must be a whole number, got 11\.5"):
        LocateOptions(diameter=11.5)


@pytest.mark.parametrize("value", [-5, 0])
def test_non_positive_separation_names_value_and_bound(value):
    with pytest.raises(ConfigError) as info:
        LocateOptions(separation=value)
    message = str(info.value)
    assert "separation" in message and f"got {value}" in message and "> 0" in message


def test_separation_none_is_allowed():
    assert LocateOptions(separation=None).separation is None


@pytest.mark.parametrize("value", [100.5, 150])
def test_percentile_above_100_names_value_and_bound(value):
    with pytest.raises(ConfigError) as info:
        LocateOptions(percentile=value)
    message = str(info.value)
    assert "percentile" in message and str(value) in message and "<= 100" in message


def test_percentile_bounds_inclusive():
    assert LocateOptions(percentile=0, locator="trackpy").percentile == 0
    assert LocateOptions(percentile=100, locator="trackpy").percentile == 100


def test_engine_choice_names_choices():
    with pytest.raises(ConfigError) as info:
        LocateOptions(engine="cuda")
    message = str(info.value)
    assert "'cuda'" in message
    assert "'auto'" in message and "'python'" in message and "'numba'" in message


def test_wrong_types_raise_config_type_error():
    with pytest.raises(ConfigTypeError, match="percentile must be a number, got 'high'"):
        LocateOptions(percentile="high")
    with pytest.raises(ConfigTypeError, match="invert must be true or false"):
        LocateOptions(invert="yes")
    with pytest.raises(ConfigTypeError, match="diameter must be a number"):
        LocateOptions(diameter=True)
    with pytest.raises(ConfigTypeError, match="background"):
        ProcessConfig(background=True)
    with pytest.raises(ConfigTypeError, match="data_key"):
        ProcessConfig(data_key="")


@pytest.mark.parametrize("kwargs, name", [
    ({"search_range": 0}, "search_range"),
    ({"memory": -1}, "memory"),
    ({"adaptive_step": 1.5}, "adaptive_step"),
    ({"linker": "hybrid"}, "linker"),
])
def test_link_options_validate(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        LinkOptions(**kwargs)


def test_process_config_validates():
    with pytest.raises(ConfigError, match="intensity_column must be one of 'amplitude', 'mass', 'signal', 'raw_mass'"):
        ProcessConfig(intensity_column="height")
    with pytest.raises(ConfigError, match="points_per_chunk must be >= 1, got 0"):
        ProcessConfig(points_per_chunk=0)


@pytest.mark.parametrize("cls, values, what", [
    (LocateOptions, {"diamter": 15}, "locate"),
    (LinkOptions, {"search-range": 5}, "link"),
    (ProcessConfig, {"search_range": 5}, "process"),
])
def test_unknown_keyword_names_it_and_the_valid_ones(cls, values, what):
    with pytest.raises(ConfigTypeError) as info:
        cls.from_dict(values)
    message = str(info.value)
    assert isinstance(info.value, TypeError)
    (bad,) = values
    assert f"unknown {what} keyword" in message and repr(bad) in message
    assert "valid keywords are" in message
    valid = {"locate": "'diameter'", "link": "'search_range'", "process": "'locate'"}[what]
    assert valid in message


def test_unknown_nested_keyword_in_process_config():
    with pytest.raises(ConfigTypeError, match="unknown locate keyword"):
        ProcessConfig.from_dict({"locate": {"diameter": 15, "bogus": 1}})


def test_nested_mappings_become_options():
    config = ProcessConfig(locate={"diameter": 11}, link={"search_range": 7})
    assert config.locate == LocateOptions(diameter=11)
    assert config.link == LinkOptions(search_range=7)


def _custom_config():
    return ProcessConfig(
        data_key="image", background=3,
        locate=dict(diameter=11, percentile=70, separation=20, minmass=5.0, topn=4,
                    locator="trackpy"),
        link=dict(search_range=30, memory=2, adaptive_stop=2.0, linker="trackpy"),
        intensity_column="signal", points_per_chunk=4,
    )


@pytest.mark.parametrize("config", [ProcessConfig(), _custom_config(),
                                    ProcessConfig(background="bg.npy")])
def test_to_dict_round_trip(config):
    values = config.to_dict()
    assert ProcessConfig.from_dict(values) == config
    # JSON-ready: the store writes it as JSON.
    assert ProcessConfig.from_dict(json.loads(config.to_json())) == config
    assert json.loads(config.to_json()) == values


def test_to_dict_is_nested_with_every_value():
    values = _custom_config().to_dict()
    assert values["locate"]["diameter"] == 11 and values["locate"]["engine"] == "auto"
    assert values["link"] == {"search_range": 30, "memory": 2, "adaptive_stop": 2.0,
                              "adaptive_step": 0.95, "neighbor_strategy": None,
                              "link_strategy": None, "linker": "trackpy",
                              "connectivity": 4, "max_gap": 1, "min_points": 2,
                              "grain_similarity": 0.75}
    assert values["background"] == 3 and values["intensity_column"] == "signal"


def test_load_config_file_dashed_and_nested_keys(tmp_path):
    path = tmp_path / "process.yaml"
    path.write_text(
        "data-key: my_image\n"
        "background: 4\n"
        "search-range: 30\n"
        "points_per_chunk: 2\n"
        "locate:\n"
        "  diameter: 11\n"
        "  noise-size: 2\n"
        "link:\n"
        "  memory: 1\n"
    )
    assert load_config_file(path) == {
        "data_key": "my_image", "background": 4, "search_range": 30, "points_per_chunk": 2,
        "diameter": 11, "noise_size": 2, "memory": 1,
    }
    assert load_config_file(str(path)) == load_config_file(path)


def test_load_config_file_json(tmp_path):
    path = tmp_path / "process.json"
    path.write_text(json.dumps({"locate": {"percentile": 64}, "intensity-column": "raw_mass"}))
    assert load_config_file(path) == {"percentile": 64, "intensity_column": "raw_mass"}


def test_load_config_file_empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config_file(path) == {}


def test_load_config_file_missing(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config_file(path)
    assert "nope.yaml" in str(info.value)


def test_load_config_file_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping.*got a list"):
        load_config_file(path)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_integer_option_raises_config_error(value):
    with pytest.raises(ConfigError, match="diameter must be finite"):
        LocateOptions(diameter=value)


def test_numpy_scalars_are_numbers():
    options = LocateOptions(diameter=np.int64(15), percentile=np.float32(80))
    assert options.diameter == 15


def test_link_strategies_and_the_intensity_column_are_checked():
    from crystalmapping.config import LinkOptions, ProcessConfig

    assert LinkOptions(link_strategy="drop", linker="trackpy").link_strategy == "drop"
    with pytest.raises(ConfigError, match="'drop' skips oversize subnets"):
        LinkOptions(link_strategy="fast")
    with pytest.raises(ConfigError, match="needs locate characterize=True"):
        ProcessConfig(intensity_column="signal", locate={"characterize": False})


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("diameter: [15\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config_file(path)


@pytest.mark.parametrize("options, rule", [
    (lambda: LocateOptions(percentile=90), "percentile=90 is trackpy.locate's"),
    (lambda: LocateOptions(threshold=3.0), "locator='bragg' does not use it"),
    (lambda: LocateOptions(engine="numba"), "Leave engine out, or set locator='trackpy'"),
    (lambda: LocateOptions(locator="trackpy", min_snr=4), "min_snr=4 is the bragg locator's"),
    (lambda: LocateOptions(locator="trackpy", max_ecc=None), "max_ecc=None"),
    (lambda: LinkOptions(memory=2), "memory=2 is trackpy.link's"),
    (lambda: LinkOptions(linker="trackpy", connectivity=8), "linker='trackpy' does not use it"),
    (lambda: LinkOptions(linker="trackpy", min_points=3), "set linker='grid'"),
])
def test_an_option_the_chosen_method_does_not_read_is_an_error(options, rule):
    with pytest.raises(ConfigError, match=rule.replace("(", r"\(").replace(")", r"\)")):
        options()


def test_options_at_their_defaults_and_shared_options_pass_with_either_method():
    assert LocateOptions(locator="trackpy", percentile=80, separation=100).percentile == 80
    assert LocateOptions(min_snr=5, max_ecc=None, minmass=3.0).min_snr == 5
    assert LinkOptions(linker="trackpy", memory=1, grain_similarity=0.5).memory == 1
    assert LinkOptions(min_points=3, search_range=20).min_points == 3
