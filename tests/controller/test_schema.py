"""Product configuration schema and task graph: clear errors, the layout of a product."""

import json

import pytest

from karoo.chunkstore.writer import VisWriterConfig
from karoo.controller.graph import EndpointAllocator, build_graph
from karoo.controller.schema import (
    PRODUCT_CONFIG_SCHEMA,
    ConfigError,
    simulated_config,
    validate_config,
)


def broken(change):
    config = simulated_config()
    change(config)
    return config


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(version="4.9"), r"version: '4.9' is not one of \['1.0'\]"),
    (lambda c: c.pop("outputs"), r"\(top level\): 'outputs' is a required property"),
    (lambda c: c.update(extra=1), r"Additional properties are not allowed \('extra'"),
    (lambda c: c["outputs"]["sdp_l0"].pop("continuum_factor"),
     "outputs/sdp_l0: 'continuum_factor' is a required property"),
    (lambda c: c["outputs"]["sdp_l0"].update(output_int_time=-1),
     "outputs/sdp_l0/output_int_time: -1 is less than or equal to the minimum of 0"),
    (lambda c: c["outputs"]["cal"].update(src_streams=["sdp_l0", "sdp_l0"]),
     "outputs/cal/src_streams: .* is too long"),
    (lambda c: c["outputs"]["cal"].update(type="sdp.imager"),
     "outputs/cal/type: 'sdp.imager' is not one of"),
    (lambda c: c["outputs"]["cal"].update(src_streams=["cbf_baseline_correlation_products"]),
     "outputs/cal/src_streams/0: 'cbf_baseline_correlation_products' is a "
     "sim.cbf.baseline_correlation_products stream; expected sdp.vis"),
    (lambda c: c["outputs"]["sdp_l0_cal_flags"].update(src_streams=["sdp_l0", "nothing"]),
     "outputs/sdp_l0_cal_flags/src_streams/1: no stream named 'nothing'"),
    (lambda c: c["outputs"]["sdp_l0_continuum"].update(output_int_time=4.0),
     "outputs/sdp_l0_continuum/output_int_time: must equal that of 'sdp_l0'"),
    (lambda c: c["outputs"]["sdp_l0_continuum"].update(continuum_factor=1),
     "must be one spectral stream"),
    (lambda c: c.update(config={"transport": "carrier-pigeon"}),
     "config/transport: 'carrier-pigeon' is not one of"),
    (lambda c: c.update(inputs={"sdp_l0": {"type": "cbf.baseline_correlation_products",
                                           "url": "spead://239.1.1.1:7148"}}),
     "stream 'sdp_l0' is both an input and an output"),
    (lambda c: c["outputs"].update({"bad name": {"type": "sdp.cal", "src_streams": ["x"]}}),
     "outputs: 'bad name' does not match"),
])
def test_schema_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(broken(change))


def test_several_problems_reported_together():
    config = broken(lambda c: (c["outputs"]["sdp_l0"].pop("output_int_time"),
                               c["outputs"]["cal"].update(bogus=True)))
    with pytest.raises(ConfigError) as info:
        validate_config(json.dumps(config))
    assert len(info.value.problems) == 2


def test_schema_is_valid_json_schema():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(PRODUCT_CONFIG_SCHEMA)


def test_real_correlator_input():
    config = simulated_config()
    sim = config["outputs"].pop("cbf_baseline_correlation_products")
    del config["simulation"]
    config["inputs"] = {"cbf_baseline_correlation_products": {
        "type": "cbf.baseline_correlation_products", "url": "spead://239.9.3.1+3:7148",
        "instrument_dev_name": "i0", "attributes": {"n_chans": sim["n_chans"]}}}
    graph = build_graph("array_1", validate_config(config), store="/data")
    assert [t.command for t in graph.tasks] == ["ingest", "cal", "vis-writer", "flag-writer",
                                                "meta-writer"]
    assert graph.telstate["cbf_baseline_correlation_products_n_chans"] == 1024
    assert graph.task("ingest.sdp_l0.1").group_config["cbf_spead"] == \
        "spead://239.9.3.1+3:7148"
    assert graph.task("ingest.sdp_l0.1").depends_ready == []


def test_graph_layout():
    config = simulated_config(ingest_servers=4, cal_servers=2, store="s3://archive",
                              s3_endpoint_url="http://s3:7480",
                              writer={"workers": 8},
                              service_overrides={"ingest.sdp_l0": {"config": {"guard": 3}},
                                                 "meta_writer": {"config": {"x": 1}}})
    graph = build_graph("array_1", config,
                        allocator=EndpointAllocator("multicast", "239.192.10.0/24"))
    ingest = graph.task("ingest.sdp_l0.3")
    assert ingest.config == {"server_id": 3} and ingest.group == "ingest.sdp_l0"
    assert ingest.group_config["servers"] == 4 and ingest.group_config["guard"] == 3
    # One L0 group per ingest server; the streams do not overlap.
    assert ingest.group_config["l0_spectral_spead"] == "udp://239.192.10.4+3:7148"
    assert ingest.group_config["l0_continuum_spead"] == "udp://239.192.10.8+3:7148"
    assert graph.task("cal.2").group_config["flags_spead"] == "udp://239.192.10.12+1:7148"
    writer = graph.task("vis_writer.sdp_l0").config
    assert writer["store"] == "s3://archive" and writer["workers"] == 8
    assert writer["s3_endpoint_url"] == "http://s3:7480"
    assert graph.task("meta_writer").config["x"] == 1
    assert set(graph.task("meta_writer").depends_ready) == {"vis_writer.sdp_l0",
                                                            "flag_writer.sdp_l0_cal_flags"}
    keys = graph.telstate_config()
    assert keys["config.ingest.sdp_l0"]["cbf_name"] == "cbf_baseline_correlation_products"
    assert keys["config.cal.1"] == {"server_id": 1}
    # Every value goes to telstate: it must be JSON-like (msgpack) data.
    json.dumps(keys)
    json.dumps(graph.telstate)


def test_writer_shard_chunks():
    """config.writer.shard_chunks reaches both writers, as the list they accept."""
    for bad in ([2], [2, 0], [2, 2, 2], "2,2", [1.5, 2]):
        with pytest.raises(ConfigError, match="config/writer/shard_chunks"):
            validate_config(simulated_config(writer={"shard_chunks": bad}))
    config = simulated_config(writer={"shard_chunks": [2, 4]})
    validate_config(config)
    graph = build_graph("array_1", config, store="/data")
    for task in ("vis_writer.sdp_l0", "flag_writer.sdp_l0_cal_flags"):
        shards = graph.task(task).config["shard_chunks"]
        assert shards == [2, 4]
        assert VisWriterConfig(shard_chunks=shards).shard_chunks == (2, 4)


def test_ingest_paced_like_the_simulated_correlator():
    def ingest_config(config):
        graph = build_graph("array_1", config, allocator=EndpointAllocator("inproc"))
        return graph.task("ingest.sdp_l0.1").group_config

    fast = simulated_config(store="/data", simulation={"clock_ratio": 0})
    assert ingest_config(fast)["clock_ratio"] == 0
    # without a clock ratio the simulator runs in real time, and so does ingest's default
    assert "clock_ratio" not in ingest_config(simulated_config(store="/data"))


def test_graph_problems():
    with pytest.raises(ConfigError, match="service_overrides/nope: no such task"):
        build_graph("a", simulated_config(service_overrides={"nope": {}}), store="/d")
    with pytest.raises(ConfigError, match="4 ingest servers share the endpoints"):
        build_graph("a", simulated_config(ingest_servers=4, transport="udp"), store="/d")
    with pytest.raises(ConfigError, match="no chunk store given"):
        build_graph("a", simulated_config())
    with pytest.raises(ConfigError, match="not a multicast network"):
        build_graph("a", simulated_config(multicast_cidr="10.0.0.0/8"), store="/d")
    # Unicast works when each stream has one receiver.
    config = simulated_config(transport="udp")
    del config["outputs"]["cal"], config["outputs"]["sdp_l0_cal_flags"]
    graph = build_graph("a", config, store="/d")
    assert graph.task("vis_writer.sdp_l0").config["l0_spead"].startswith("udp://127.0.0.1:")
