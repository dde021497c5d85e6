"""Decoder and normalize() specifications, against raw JSON-RPC logs built by hand (no chain, no database).

Expected values are computed here with eth_abi / eth_utils or taken from the documented constants in
shared/mission/contract-events.md, never from the decoder's own output.
"""

from __future__ import annotations

import pytest
from eth_abi import encode
from eth_utils import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from orderbook_pipelines.chain.decoding import DecodedLog, Decoder, Rejected, event_topic
from orderbook_pipelines.chain.normalize import MarketRegistry, normalize
from orderbook_pipelines.config import parse_config
from tests.conftest import GEN1_BOOK, GEN2_BOOK, ROUTER, sample_config

UNREGISTERED = "0x" + "44" * 20
TRADER = "0xAbCdEf0123456789aBcDeF0123456789AbCdEf01"  # mixed case on purpose
MAKER = "0x" + "5a" * 20

BLOCK_HASH = "0x" + "bb" * 32
TX_A = "0x" + "a1" * 32
TX_B = "0x" + "b2" * 32

# topic0 constants as documented in contract-events.md (verified there by hashing / from sources)
DOC_TOPIC0 = {
    ("gen1_router", "OrderPlaced"): "0x5b954fa335c624976b5c2dba7c7a172770d02d8b36e6da6cfcc1b79baa62bfc8",
    ("gen1_router", "OrderExecuted"): "0x1cd65e6e4f6a6bfcff65064f4e22d514f481a38dcbe4c2ad13ccde1b22e06941",
    ("gen1_router", "OrderCancelled"): "0xc4058ebc534b64ecb27b2d4eaa1904f98997ec18ebe6ada4117593dde89478cc",
    ("gen1_book", "OrderMatched"): "0xe5426fa5d075d3a0a2ce3373a3df298c78eec0ded097810b0e69a92c21b4b0b3",
    ("gen1_book", "OrderAdded"): "0x7ba82b04178afc54955ca8ffb2f2c84b852279ebd4373b70c307228cfd9709e6",
    ("gen1_book", "OrderRemoved"): "0x71182d10376950d82a5fc16348a731d1f4f8a48ab4842080450b270afdfef775",
    ("gen2_book", "OrderPlaced"): "0x348379522536ddee6c265b4008f5063ca68d4ee1e27925ba2a01236bab3c59e6",
    ("gen2_book", "OrderCancelled"): "0xb2705df32ac67fc3101f496cd7036bf59074a603544d97d73650b6f09744986a",
    ("gen2_book", "OrderFilled"): "0x043f1fb3781a272561a63f61d52b4dbd6524d6d0a8cd1e003888f2a341974e8f",
    ("gen2_book", "TradeExecuted"): "0xcfaae44f59cdc0459335ad7fa6324241a4e86a442fc914e1aea4f2076aba7a50",
}
# The *book contract* form of OrderAdded (2 indexed args) - documented, but not in the configured ABI.
DOC_BOOK_ORDER_ADDED = "0x184a980efa61c0acfeff92c0613bf2d3aceedadec9002d919c6bde9218b56c68"

T_PLACED = DOC_TOPIC0[("gen1_router", "OrderPlaced")]
T_EXECUTED = DOC_TOPIC0[("gen1_router", "OrderExecuted")]
T_CANCELLED = DOC_TOPIC0[("gen1_router", "OrderCancelled")]
T_MATCHED = DOC_TOPIC0[("gen1_book", "OrderMatched")]
T_LIB_ADDED = DOC_TOPIC0[("gen1_book", "OrderAdded")]
T_REMOVED = DOC_TOPIC0[("gen1_book", "OrderRemoved")]
T2_PLACED = DOC_TOPIC0[("gen2_book", "OrderPlaced")]
T2_FILLED = DOC_TOPIC0[("gen2_book", "OrderFilled")]

U256_MAX = 2**256 - 1


def raw_config() -> dict:
    return sample_config()


ADDRESS_SOURCES = {ROUTER: "gen1_router", GEN1_BOOK: "gen1_book", GEN2_BOOK: "gen2_book"}


@pytest.fixture(scope="module")
def config():
    return parse_config(raw_config())


@pytest.fixture(scope="module")
def decoder(config) -> Decoder:
    return Decoder(config, ADDRESS_SOURCES)


# -- helpers that build raw logs independently of the decoder ------------------------------------------------
def word(typ: str, value) -> str:
    return "0x" + encode([typ], [value]).hex()


def data_of(types: list[str], values: list) -> str:
    return "0x" + encode(types, values).hex()


def raw_log(
    address: str,
    topics: list[str],
    data: str,
    *,
    block: int = 7,
    tx: str = TX_A,
    tx_index: int = 0,
    log_index: int = 0,
) -> dict:
    return {
        "address": address,
        "topics": topics,
        "data": data,
        "blockNumber": hex(block),
        "blockHash": BLOCK_HASH,
        "transactionHash": tx,
        "transactionIndex": hex(tx_index),
        "logIndex": hex(log_index),
        "removed": False,
    }


def metric_hash(metric: str) -> str:
    return "0x" + keccak(text=metric).hex()


def gen1_placed(
    order_id=1,
    trader=TRADER,
    metric="SILVER_V1",
    order_type=1,
    side=0,
    quantity=10**18,
    price=2 * 10**18,
    **kw,
) -> dict:
    return raw_log(
        ROUTER,
        [T_PLACED, word("uint256", order_id), word("address", trader), metric_hash(metric)],
        data_of(["uint8", "uint8", "uint256", "uint256"], [order_type, side, quantity, price]),
        **kw,
    )


def gen1_executed(order_id=1, trader=TRADER, qty=10**18, price=2 * 10**18, ts=1_700_000_000, **kw) -> dict:
    return raw_log(
        ROUTER,
        [T_EXECUTED, word("uint256", order_id), word("address", trader)],
        data_of(["uint256", "uint256", "uint256"], [qty, price, ts]),
        **kw,
    )


def gen2_placed(
    order_id: bytes, user=TRADER, side=0, size=5_000_000, price=1_250_000, ts=1_700_000_000, **kw
) -> dict:
    return raw_log(
        GEN2_BOOK,
        [T2_PLACED, word("bytes32", order_id), word("address", user)],
        data_of(["uint8", "uint256", "uint256", "uint256"], [side, size, price, ts]),
        **kw,
    )


def decoded(decoder: Decoder, log: dict) -> DecodedLog:
    out = decoder.decode(log)
    assert isinstance(out, DecodedLog), getattr(out, "reason", out)
    return out


def rejected(decoder: Decoder, log: dict) -> Rejected:
    out = decoder.decode(log)
    assert isinstance(out, Rejected), f"expected a rejection, got {out}"
    return out


# -- topic0 ------------------------------------------------------------------------------------------------
def test_every_configured_event_topic0_matches_documented_constant(config, decoder):
    configured = {(s.name, ev) for s in config.sources for ev in s.events}
    assert configured == set(DOC_TOPIC0)
    spec_topics = {(spec.source, spec.name): spec.topic0 for spec in decoder.specs.values()}
    assert spec_topics == DOC_TOPIC0
    for src in config.sources:
        for e in src.abi_entries:
            if e.get("type") == "event" and e["name"] in src.events:
                assert event_topic(e) == DOC_TOPIC0[(src.name, e["name"])]


def test_event_topic_hashes_canonical_signature():
    abi_ev = {
        "type": "event",
        "name": "OrderRemoved",
        "inputs": [
            {"name": "orderId", "type": "uint256", "indexed": True},
            {"name": "price", "type": "uint256", "indexed": False},
            {"name": "side", "type": "uint8", "indexed": False},
        ],
    }
    assert event_topic(abi_ev) == "0x" + keccak(text="OrderRemoved(uint256,uint256,uint8)").hex()
    assert event_topic(abi_ev) == T_REMOVED


def test_documented_metric_hash_prefix():
    # contract-events.md: keccak("SILVER_V1") starts 0x864a895a
    assert metric_hash("SILVER_V1").startswith("0x864a895a")


# -- successful decoding -----------------------------------------------------------------------------------
def test_gen1_order_placed_decodes_every_argument(decoder):
    big_qty = 2**255 + 1
    out = decoded(
        decoder,
        gen1_placed(
            order_id=U256_MAX,
            order_type=8,
            side=1,
            quantity=big_qty,
            price=U256_MAX,
            block=123,
            tx_index=4,
            log_index=9,
        ),
    )
    assert out.source == "gen1_router"
    assert out.event == "OrderPlaced"
    assert out.mapping.kind.value == "open"
    assert out.args == {
        "orderId": U256_MAX,
        "trader": TRADER.lower(),
        "metricId": "0x864a895aed81431ba14df14feec24e3ac90a6dcb724fedd473ddfd2042c765d6",
        "orderType": 8,
        "side": 1,
        "quantity": big_qty,
        "price": U256_MAX,
    }
    assert out.args["metricId"] == metric_hash("SILVER_V1")
    assert out.pos.block_number == 123
    assert out.pos.tx_index == 4
    assert out.pos.log_index == 9
    assert out.pos.address == ROUTER
    assert out.pos.tx_hash == TX_A
    assert out.pos.block_hash == BLOCK_HASH


def test_log_position_lowercases_hashes_and_address(decoder):
    log = gen1_placed()
    log["address"] = ROUTER.upper().replace("0X", "0x")
    log["blockHash"] = BLOCK_HASH.upper().replace("0X", "0x")
    log["transactionHash"] = TX_A.upper().replace("0X", "0x")
    out = decoded(decoder, log)
    assert (out.pos.address, out.pos.block_hash, out.pos.tx_hash) == (ROUTER, BLOCK_HASH, TX_A)


def test_gen1_order_executed_and_cancelled(decoder):
    out = decoded(decoder, gen1_executed(order_id=42, qty=3, price=2**255 + 1, ts=99))
    assert out.event == "OrderExecuted"
    assert out.args == {
        "orderId": 42,
        "trader": TRADER.lower(),
        "executedQuantity": 3,
        "executedPrice": 2**255 + 1,
        "timestamp": 99,
    }
    log = raw_log(ROUTER, [T_CANCELLED, word("uint256", 42), word("address", TRADER)], word("uint256", 7))
    out = decoded(decoder, log)
    assert out.event == "OrderCancelled"
    assert out.mapping.kind.value == "cancel"
    assert out.args == {"orderId": 42, "trader": TRADER.lower(), "remainingQuantity": 7}


def test_gen1_book_order_matched(decoder):
    buyer, seller = "0x" + "0a" * 20, "0x" + "0b" * 20
    log = raw_log(
        GEN1_BOOK,
        [T_MATCHED, word("uint256", 5), word("uint256", 6)],
        data_of(["uint256", "uint256", "address", "address"], [10, 20, buyer, seller]),
    )
    out = decoded(decoder, log)
    assert out.source == "gen1_book"
    assert out.args == {
        "buyOrderId": 5,
        "sellOrderId": 6,
        "price": 10,
        "quantity": 20,
        "buyer": buyer,
        "seller": seller,
    }


def test_gen2_order_placed_bytes32_id_is_hex(decoder):
    oid = keccak(text="some order")
    out = decoded(decoder, gen2_placed(oid, side=1, size=7, price=0, ts=5))
    assert out.source == "gen2_book"
    assert out.args == {
        "orderId": "0x" + oid.hex(),
        "user": TRADER.lower(),
        "side": 1,
        "size": 7,
        "price": 0,
        "timestamp": 5,
    }
    assert len(out.args["orderId"]) == 66


def test_gen2_order_filled_three_indexed(decoder):
    oid = bytes(range(32))
    log = raw_log(
        GEN2_BOOK,
        [T2_FILLED, word("bytes32", oid), word("address", TRADER), word("address", MAKER)],
        data_of(["uint256", "uint256", "uint256"], [11, 22, 33]),
    )
    out = decoded(decoder, log)
    assert out.args == {
        "orderId": "0x" + oid.hex(),
        "taker": TRADER.lower(),
        "maker": MAKER,
        "size": 11,
        "price": 22,
        "timestamp": 33,
    }


def test_library_order_added_decodes_from_book(decoder):
    # library layout: OrderAdded(uint256 indexed orderId, uint256 price, uint8 side, uint256 quantity)
    log = raw_log(
        GEN1_BOOK, [T_LIB_ADDED, word("uint256", 3)], data_of(["uint256", "uint8", "uint256"], [9, 1, 4])
    )
    out = decoded(decoder, log)
    assert out.event == "OrderAdded"
    assert out.mapping.kind.value == "book_add"
    assert out.args == {"orderId": 3, "price": 9, "side": 1, "quantity": 4}


def test_book_contract_order_added_layout_is_not_confused_with_library_one(decoder):
    # book layout: OrderAdded(uint256 indexed orderId, address indexed trader, uint8 side, uint256 quantity,
    # uint256 price) - a different topic0; it is not in the configured ABI, so it is rejected, never
    # decoded with the library layout.
    assert (
        "0x" + keccak(text="OrderAdded(uint256,address,uint8,uint256,uint256)").hex() == DOC_BOOK_ORDER_ADDED
    )
    topics = [DOC_BOOK_ORDER_ADDED, word("uint256", 3), word("address", TRADER)]
    data = data_of(["uint8", "uint256", "uint256"], [1, 4, 9])
    r = rejected(decoder, raw_log(GEN1_BOOK, topics, data))
    assert "unknown event topic0" in r.reason
    assert DOC_BOOK_ORDER_ADDED in r.reason
    # book-layout arguments under the library topic0: wrong topic count -> rejected, not mis-decoded
    r = rejected(decoder, raw_log(GEN1_BOOK, [T_LIB_ADDED, *topics[1:]], data))
    assert "expected 2 topics, got 3" in r.reason


def test_library_order_added_from_router_is_unknown(decoder):
    # the router ABI has no OrderAdded at all
    log = raw_log(
        ROUTER, [T_LIB_ADDED, word("uint256", 3)], data_of(["uint256", "uint8", "uint256"], [9, 1, 4])
    )
    r = rejected(decoder, log)
    assert "unknown event topic0" in r.reason
    assert "gen1_router" in r.reason


def test_gen2_topic0_at_router_is_unknown(decoder):
    # gen1 and gen2 OrderCancelled have different topic0s; a gen2 topic0 at the router is unknown
    oid = b"\x01" * 32
    log = raw_log(
        ROUTER,
        [DOC_TOPIC0[("gen2_book", "OrderCancelled")], word("bytes32", oid), word("address", TRADER)],
        word("uint256", 1),
    )
    r = rejected(decoder, log)
    assert "unknown event topic0" in r.reason


# -- rejections ------------------------------------------------------------------------------------------
def assert_nothing_lost(r: Rejected, log: dict) -> None:
    assert r.topics == tuple(t.lower() for t in log["topics"])
    assert r.data == log["data"]


def test_reject_wrong_topic_count(decoder):
    log = gen1_placed()
    log["topics"] = log["topics"][:3]  # metric hash missing
    r = rejected(decoder, log)
    assert "expected 4 topics, got 3" in r.reason
    assert "OrderPlaced(uint256,address,string,uint8,uint8,uint256,uint256)" in r.reason
    assert_nothing_lost(r, log)


def test_reject_extra_topic(decoder):
    log = gen1_executed()
    log["topics"] = [*log["topics"], word("uint256", 1)]
    r = rejected(decoder, log)
    assert "expected 3 topics, got 4" in r.reason
    assert_nothing_lost(r, log)


@pytest.mark.parametrize("delta_bytes", [-32, -1, 1, 32])
def test_reject_data_length(decoder, delta_bytes):
    log = gen1_executed()
    data = bytes.fromhex(log["data"][2:])
    data = data[:delta_bytes] if delta_bytes < 0 else data + b"\x00" * delta_bytes
    log["data"] = "0x" + data.hex()
    r = rejected(decoder, log)
    assert f"data is {96 + delta_bytes} bytes, expected 96" in r.reason
    assert_nothing_lost(r, log)


def test_reject_empty_data(decoder):
    log = gen1_executed()
    log["data"] = "0x"
    r = rejected(decoder, log)
    assert "data is 0 bytes, expected 96" in r.reason


def test_reject_uint8_out_of_range(decoder):
    log = gen1_placed()
    # orderType = 256 does not fit uint8
    log["data"] = data_of(["uint256", "uint256", "uint256", "uint256"], [256, 0, 1, 1])
    r = rejected(decoder, log)
    assert "uint8 out of range: 256" in r.reason
    assert_nothing_lost(r, log)


def test_reject_address_with_dirty_padding_in_data(decoder):
    good = data_of(["uint256", "uint256", "address", "address"], [10, 20, "0x" + "0a" * 20, "0x" + "0b" * 20])
    raw = bytearray(bytes.fromhex(good[2:]))
    raw[2 * 32] = 0x01  # first padding byte of `buyer`
    log = raw_log(GEN1_BOOK, [T_MATCHED, word("uint256", 5), word("uint256", 6)], "0x" + raw.hex())
    r = rejected(decoder, log)
    assert "address word has non-zero padding" in r.reason
    assert_nothing_lost(r, log)


def test_reject_address_with_dirty_padding_in_topic(decoder):
    log = gen1_executed()
    log["topics"][2] = "0xff" + log["topics"][2][4:]
    r = rejected(decoder, log)
    assert "non-zero padding" in r.reason
    assert_nothing_lost(r, log)


def test_reject_short_topic(decoder):
    log = gen1_executed()
    log["topics"][1] = "0x2a"
    r = rejected(decoder, log)
    assert "orderId" in r.reason and "32 bytes" in r.reason


def test_reject_non_hex_data(decoder):
    log = gen1_executed()
    log["data"] = "0x" + "zz" * 96
    r = rejected(decoder, log)
    assert r.reason.startswith("malformed OrderExecuted(")
    assert_nothing_lost(r, log)


def test_reject_unknown_topic0_from_known_contract(decoder):
    unknown = "0x" + keccak(text="Whatever(uint256)").hex()
    log = raw_log(GEN2_BOOK, [unknown, word("uint256", 1)], "0x")
    r = rejected(decoder, log)
    assert "unknown event topic0" in r.reason
    assert unknown in r.reason
    assert "gen2_book" in r.reason
    assert_nothing_lost(r, log)


def test_reject_anonymous_log(decoder):
    log = raw_log(GEN2_BOOK, [], "0x")
    r = rejected(decoder, log)
    assert "no topic0" in r.reason


def test_reject_unregistered_address(decoder):
    log = gen1_executed()
    log["address"] = UNREGISTERED
    r = rejected(decoder, log)
    assert "unregistered contract" in r.reason
    assert UNREGISTERED in r.reason
    assert r.pos.address == UNREGISTERED
    assert_nothing_lost(r, log)


@pytest.mark.parametrize(
    "missing", ["blockNumber", "blockHash", "transactionHash", "transactionIndex", "logIndex", "address"]
)
def test_reject_missing_envelope_field(decoder, missing):
    log = gen1_executed(block=55, log_index=3)
    del log[missing]
    r = rejected(decoder, log)
    assert "malformed log envelope" in r.reason
    assert missing in r.reason
    assert_nothing_lost(r, log)
    if missing != "blockNumber":
        assert r.pos.block_number == 55
    else:
        assert r.pos.block_number == -1


def test_reject_pending_log_with_null_block_number(decoder):
    log = gen1_executed()
    log["blockNumber"] = None
    r = rejected(decoder, log)
    assert "malformed log envelope" in r.reason
    assert_nothing_lost(r, log)


# -- property: encode -> decode round trip -------------------------------------------------------------------
addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
uint256 = st.integers(min_value=0, max_value=U256_MAX)


@settings(max_examples=200, deadline=None)
@given(
    order_id=uint256,
    trader=addresses,
    qty=uint256,
    price=uint256,
    ts=uint256,
    block=st.integers(0, 2**40),
    log_index=st.integers(0, 10_000),
)
def test_order_executed_round_trip(decoder, order_id, trader, qty, price, ts, block, log_index):
    log = raw_log(
        ROUTER,
        [T_EXECUTED, word("uint256", order_id), word("address", trader)],
        data_of(["uint256", "uint256", "uint256"], [qty, price, ts]),
        block=block,
        log_index=log_index,
    )
    out = decoded(decoder, log)
    assert out.args == {
        "orderId": order_id,
        "trader": trader,
        "executedQuantity": qty,
        "executedPrice": price,
        "timestamp": ts,
    }
    assert (out.pos.block_number, out.pos.log_index) == (block, log_index)


@settings(max_examples=100, deadline=None)
@given(
    order_id=st.binary(min_size=32, max_size=32),
    user=addresses,
    side=st.integers(0, 255),
    size=uint256,
    price=uint256,
    ts=uint256,
)
def test_gen2_order_placed_round_trip(decoder, order_id, user, side, size, price, ts):
    out = decoded(decoder, gen2_placed(order_id, user=user, side=side, size=size, price=price, ts=ts))
    assert out.args == {
        "orderId": "0x" + order_id.hex(),
        "user": user,
        "side": side,
        "size": size,
        "price": price,
        "timestamp": ts,
    }


# -- decoder construction ----------------------------------------------------------------------------------
def test_decoder_address_sources_are_case_insensitive(config):
    dec = Decoder(config, {ROUTER.upper().replace("0X", "0x"): "gen1_router"})
    assert isinstance(dec.decode(gen1_executed()), DecodedLog)


# -- normalize ----------------------------------------------------------------------------------------------
SILVER_ID, ALUMINUM_ID, GOLD_ID = 1, 2, 3
REGISTRY = MarketRegistry(
    by_address={GEN1_BOOK: SILVER_ID, GEN2_BOOK: ALUMINUM_ID},
    by_metric_hash={metric_hash("SILVER_V1"): SILVER_ID, metric_hash("GOLD_V1"): GOLD_ID},
)


def test_normalize_gen1_placed_resolves_market_by_metric_hash(decoder):
    rows = normalize(
        [decoded(decoder, gen1_placed(order_id=77, order_type=1, side=1, quantity=5, price=6))],
        REGISTRY,
        31337,
    )
    [row] = rows
    assert row.market_id == SILVER_ID
    assert row.kind == "open"
    assert row.order_id == "77"
    assert row.trader == TRADER.lower()
    assert (row.side, row.order_type, row.price, row.quantity) == (1, 1, 6, 5)
    assert row.chain_id == 31337
    assert row.contract == ROUTER


def test_normalize_executed_takes_market_of_placed_in_same_tx(decoder):
    logs = [
        gen1_placed(order_id=1, tx=TX_A, log_index=0),
        gen1_executed(order_id=1, tx=TX_A, log_index=1, qty=4, price=9),
        gen1_executed(order_id=2, tx=TX_B, log_index=2),  # no other log in its tx
    ]
    rows = normalize([decoded(decoder, lg) for lg in logs], REGISTRY, 31337)
    assert [r.kind for r in rows] == ["open", "fill", "fill"]
    assert rows[1].market_id == SILVER_ID
    assert (rows[1].order_id, rows[1].quantity, rows[1].price) == ("1", 4, 9)
    assert rows[2].market_id is None


def test_normalize_executed_before_placed_in_same_tx(decoder):
    logs = [gen1_executed(order_id=1, tx=TX_A, log_index=0), gen1_placed(order_id=1, tx=TX_A, log_index=1)]
    rows = normalize([decoded(decoder, lg) for lg in logs], REGISTRY, 31337)
    assert rows[0].market_id == SILVER_ID


def test_normalize_unresolvable_metric_hash_gives_none(decoder):
    logs = [gen1_placed(metric="UNKNOWN_V9", tx=TX_A), gen1_executed(tx=TX_A, log_index=1)]
    rows = normalize([decoded(decoder, lg) for lg in logs], REGISTRY, 31337)
    assert [r.market_id for r in rows] == [None, None]


def test_normalize_multi_market_tx_fill_takes_its_orders_market(decoder):
    """A multicall places orders in two markets; each fill belongs to its own order's market, not to 'the tx'."""
    logs = [
        gen1_placed(order_id=1, metric="SILVER_V1", tx=TX_A, log_index=0),
        gen1_placed(order_id=2, metric="GOLD_V1", tx=TX_A, log_index=1),
        gen1_executed(order_id=2, tx=TX_A, log_index=2),
        gen1_executed(order_id=1, tx=TX_A, log_index=3),
    ]
    rows = normalize([decoded(decoder, lg) for lg in logs], REGISTRY, 31337)
    assert [r.market_id for r in rows] == [SILVER_ID, GOLD_ID, GOLD_ID, SILVER_ID]


def test_normalize_fill_of_earlier_order_uses_the_order_lookup_over_the_tx(decoder):
    """Order 7 (GOLD) was opened in an earlier batch; its fill shares a tx with a SILVER open only. The lookup
    decides (asked once, only for orders the batch does not open); the tx's single market is not used."""
    asked: list[set[str]] = []

    def lookup(keys: set[str]) -> dict[str, int]:
        asked.append(set(keys))
        return {f"{ROUTER.lower()}:7": GOLD_ID}

    logs = [gen1_placed(order_id=1, metric="SILVER_V1", tx=TX_A, log_index=0),
            gen1_executed(order_id=7, tx=TX_A, log_index=1),
            gen1_executed(order_id=1, tx=TX_A, log_index=2)]
    rows = normalize([decoded(decoder, lg) for lg in logs], REGISTRY, 31337, lookup)
    assert [r.market_id for r in rows] == [SILVER_ID, GOLD_ID, SILVER_ID]
    assert asked == [{f"{ROUTER.lower()}:7"}]


def test_normalize_unknown_order_falls_back_to_a_single_market_tx_only(decoder):
    single = [gen1_placed(order_id=1, metric="SILVER_V1", tx=TX_A, log_index=0),
              gen1_executed(order_id=9, tx=TX_A, log_index=1)]
    multi = [gen1_placed(order_id=1, metric="SILVER_V1", tx=TX_A, log_index=0),
             gen1_placed(order_id=2, metric="GOLD_V1", tx=TX_A, log_index=1),
             gen1_executed(order_id=9, tx=TX_A, log_index=2)]
    assert normalize([decoded(decoder, lg) for lg in single], REGISTRY, 31337, lambda k: {})[1].market_id == SILVER_ID
    assert normalize([decoded(decoder, lg) for lg in multi], REGISTRY, 31337, lambda k: {})[2].market_id is None


def test_normalize_gen2_order_type_from_price(decoder):
    market = gen2_placed(keccak(text="m"), price=0, log_index=0)
    limit = gen2_placed(keccak(text="l"), price=1, log_index=1)
    rows = normalize([decoded(decoder, market), decoded(decoder, limit)], REGISTRY, 31337)
    assert [r.order_type for r in rows] == [0, 1]
    assert [r.market_id for r in rows] == [ALUMINUM_ID, ALUMINUM_ID]
    assert rows[0].order_id == "0x" + keccak(text="m").hex()
    assert rows[0].quantity == 5_000_000


def test_normalize_gen2_fill_maps_taker_and_maker(decoder):
    oid = keccak(text="f")
    log = raw_log(
        GEN2_BOOK,
        [T2_FILLED, word("bytes32", oid), word("address", TRADER), word("address", MAKER)],
        data_of(["uint256", "uint256", "uint256"], [11, 22, 33]),
    )
    [row] = normalize([decoded(decoder, log)], REGISTRY, 1)
    assert (row.kind, row.order_id, row.trader, row.counterparty, row.quantity, row.price) == (
        "fill",
        "0x" + oid.hex(),
        TRADER.lower(),
        MAKER,
        11,
        22,
    )
    assert row.order_type is None  # only opens derive an order type
    assert row.market_id == ALUMINUM_ID


# -- decode_all: one answer's logs, block and transaction fields parsed once ---------------------------------------
def _answer(rnd) -> list[dict]:
    """Logs as a node's answer lists them (blocks and transactions in runs), with damaged ones mixed in: a block
    number or a transaction index that changes under the same hash, missing and null fields, bad data."""
    out: list[dict] = []
    for b in range(rnd.randint(1, 4)):
        block_hash = "0x" + f"{b:02x}" * 32
        for t in range(rnd.randint(1, 3)):
            tx = "0x" + f"{b * 16 + t:02x}" * 32
            for _ in range(rnd.randint(1, 4)):
                make = rnd.choice([gen1_placed, gen1_executed])
                log = make(order_id=rnd.randint(1, 10**6), block=100 + b, tx=tx, tx_index=t,
                           log_index=len(out), quantity=rnd.randint(1, U256_MAX)) if make is gen1_placed else \
                    make(order_id=rnd.randint(1, 10**6), block=100 + b, tx=tx, tx_index=t, log_index=len(out))
                log["blockHash"] = block_hash.upper().replace("0X", "0x") if rnd.random() < 0.2 else block_hash
                damage = rnd.random()
                if damage < 0.05:
                    del log[rnd.choice(["blockNumber", "blockHash", "transactionHash", "transactionIndex",
                                        "logIndex", "address"])]
                elif damage < 0.08:
                    log["blockNumber"] = None
                elif damage < 0.11:
                    log["blockNumber"] = hex(rnd.randint(0, 99))  # same hash, another number
                elif damage < 0.14:
                    log["transactionIndex"] = hex(rnd.randint(5, 9))  # same transaction hash, another index
                elif damage < 0.17:
                    log["data"] = log["data"][:-2]
                elif damage < 0.19:
                    log["transactionHash"] = 7
                out.append(log)
    return out


def test_decode_all_equals_decoding_each_log_alone(decoder):
    """The per-answer path reuses parsed block and transaction fields: whatever the answer holds, it must give what
    `decode` gives log by log (the reference here), in order, accepted and rejected alike."""
    import random

    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    for _ in range(200):
        logs = _answer(rnd)
        each = [decoder.decode(lg) for lg in logs]
        decoded, rejected_ = decoder.decode_all(logs)
        assert decoded == [d for d in each if isinstance(d, DecodedLog)], f"seed {seed}"
        assert rejected_ == [d for d in each if isinstance(d, Rejected)], f"seed {seed}"


@given(order_id=st.integers(0, U256_MAX), quantity=st.integers(0, U256_MAX), price=st.integers(0, U256_MAX),
       order_type=st.integers(0, 255), side=st.integers(0, 255))
@settings(max_examples=200, deadline=None)
def test_args_json_of_static_events_is_the_generic_json(decoder, order_id, quantity, price, order_type, side):
    """The format-string writer of all-static events writes what orjson writes from the converted arguments."""
    import json

    out = decoded(decoder, gen1_placed(order_id=order_id, quantity=quantity, price=price, order_type=order_type,
                                       side=side))
    text = out.spec.args_json(out.args)
    assert text == json.dumps({k: str(v) if isinstance(v, int) else v for k, v in out.args.items()},
                              sort_keys=True, separators=(",", ":"))
    assert json.loads(text)["quantity"] == str(quantity)


# -- the generated decoder of all-static events against the generic one ------------------------------------------
_STATIC_TYPES = ["uint8", "uint32", "uint256", "int8", "int256", "bool", "address", "bytes4", "bytes32"]


@st.composite
def _static_event_and_log(draw):
    """An all-static event (any mix of types, some indexed, maybe an indexed string) and topics and data that fit
    it, or nearly: random words (out of range for small types, dirty padding), wrong lengths, odd hex."""
    from orderbook_pipelines.chain.decoding import _Param

    types = draw(st.lists(st.sampled_from(_STATIC_TYPES), min_size=0, max_size=6))
    flags = [draw(st.booleans()) for _ in types]
    indexed = [_Param(f"i{n}", t) for n, (t, f) in enumerate(zip(types, flags, strict=True)) if f][:3]
    if len(indexed) < 3 and draw(st.booleans()):
        indexed.append(_Param("label", "string"))
    data = [_Param(f"d{n}", t) for n, (t, f) in enumerate(zip(types, flags, strict=True)) if not f]

    def word(p) -> str:
        pick = draw(st.integers(0, 5))
        if pick == 0:  # any 32 bytes: often out of range or badly padded
            return draw(st.binary(min_size=32, max_size=32)).hex()
        if pick == 1:  # just past the type's range (or its padding)
            digits = "".join(c for c in p.type if c.isdigit())
            bits = {"bool": 1, "address": 160}.get(p.type) or int(digits) * (8 if p.type.startswith("bytes") else 1)
            if p.type.startswith("bytes"):
                return ("00" * (bits // 8) + "01").ljust(64, "0")[:64] if bits < 256 else "00" * 32
            if p.type.startswith("int"):
                return encode(["int256"], [draw(st.sampled_from([2 ** (bits - 1), -(2 ** (bits - 1)) - 1]))]).hex() \
                    if bits < 256 else encode(["int256"], [-1]).hex()
            return encode(["uint256"], [2 ** bits]).hex() if bits < 256 else "ff" * 32
        value = {"bool": draw(st.booleans()), "address": "0x" + draw(st.binary(min_size=20, max_size=20)).hex(),
                 }.get(p.type)
        if value is None and p.type.startswith("uint"):
            value = draw(st.integers(0, 2 ** int(p.type[4:]) - 1))
        elif value is None and p.type.startswith("int"):
            bits = int(p.type[3:])
            value = draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
        elif value is None:
            value = draw(st.binary(min_size=int(p.type[5:]), max_size=int(p.type[5:])))
        return encode([p.type], [value]).hex()

    topics = ["0x" + "ab" * 32] + ["0x" + (word(p) if p.type != "string" else keccak(text="x").hex()) for p in indexed]
    body = "".join(word(p) for p in data)
    damage = draw(st.integers(0, 9))
    if damage == 0 and topics[1:]:
        topics[draw(st.integers(1, len(topics) - 1))] = draw(st.sampled_from(["0x12", "0x" + "zz" * 32, 7, None,
                                                                            "0X" + "00" * 32, "0x" + "AB" * 32]))
    elif damage == 1:
        topics = topics[:-1] if len(topics) > 1 else [*topics, "0x" + "00" * 32]
    elif damage == 2:
        body = body[: draw(st.integers(0, len(body)))] + draw(st.sampled_from(["", "00", "0" * 64, "g", " 0"]))
    elif damage == 3:
        body = body.upper()
    data_hex = draw(st.sampled_from(["0x", "0x", "0x", "", "0X"])) + body if damage == 4 else "0x" + body
    return indexed, data, topics, data_hex


@given(case=_static_event_and_log())
@settings(max_examples=600, deadline=None)
def test_generated_decoder_of_static_events_equals_the_generic_one(decoder, case):
    """Decoder._decode_args (the loop over converters) is the reference: the generated straight-line decoder must
    return exactly its arguments, in its order, and refuse exactly what it refuses."""
    from orderbook_pipelines.chain.decoding import EventSpec

    indexed, data, topics, data_hex = case
    mapping = next(iter(decoder.specs.values())).mapping
    spec = EventSpec("s", "E", "E()", "0x" + "ab" * 32, tuple(indexed), tuple(data), mapping)
    assert spec.fast_args is not None
    try:
        want: object = Decoder._decode_args(spec, topics, data_hex)
    except (ValueError, OverflowError, TypeError, AttributeError):
        want = "refused"
    try:
        got: object = spec.fast_args(topics, data_hex)
    except Exception:  # any refusal: the decoder then asks the generic path why
        got = "refused"
    assert got == want
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        assert [type(v) for v in got.values()] == [type(v) for v in want.values()]


# -- logs read straight into rows against decode-then-normalize ----------------------------------------------------
@st.composite
def _mapped_batch(draw):
    """An all-static event from `_static_event_and_log`, a random mapping of it (kind, canonical fields onto its
    arguments, market rule), a registry that may or may not know its contract and metric hash, and a batch of its
    logs: the drawn one (maybe malformed) at several positions, with envelopes that are sometimes broken."""
    from orderbook_pipelines.chain.decoding import EventSpec
    from orderbook_pipelines.config import CANONICAL_FIELDS, EventKind, EventMapping

    indexed, data, topics, data_hex = draw(_static_event_and_log())
    names = [p.name for p in (*indexed, *data)]
    fields = {f: draw(st.sampled_from(names)) for f in CANONICAL_FIELDS if names and draw(st.booleans())}
    rules = ["emitter", "tx", *(f"metric_hash:{n}" for n in names)]
    # Unvalidated: any kind with any fields (a configuration file is checked when it loads; the builder is not).
    mapping = EventMapping.model_construct(kind=draw(st.sampled_from(list(EventKind))), fields=fields,
                                           market=draw(st.sampled_from(rules)))
    spec = EventSpec("s", "E", "E()", "0x" + "ab" * 32, tuple(indexed), tuple(data), mapping)
    address = "0x" + "c3" * 20
    hashes = {str(t).lower() for t in topics[1:]} | {"0x" + "00" * 32}
    registry = MarketRegistry({address: 7} if draw(st.booleans()) else {},
                              {h: 9 for h in hashes if draw(st.booleans())})
    logs = []
    for i in range(draw(st.integers(1, 4))):
        log = {"address": draw(st.sampled_from([address, address.upper().replace("0X", "0x"), UNREGISTERED])),
               "topics": list(topics), "data": data_hex, "blockNumber": hex(10 + i // 2),
               "blockHash": "0x" + f"{10 + i // 2:02x}" * 32, "transactionHash": "0x" + f"{i % 2:02x}" * 32,
               "transactionIndex": hex(i % 2), "logIndex": hex(i), "removed": False}
        if draw(st.integers(0, 9)) == 0:
            del log[draw(st.sampled_from(["blockNumber", "logIndex", "address", "topics", "data"]))]
        logs.append(log)
    if draw(st.booleans()) and topics[1:]:
        logs.append({**logs[0], "topics": ["0x" + "cd" * 32, *topics[1:]], "logIndex": hex(len(logs))})  # unknown
    return spec, address, registry, logs


@given(case=_mapped_batch())
@settings(max_examples=500, deadline=None)
def test_logs_read_straight_into_rows_equal_decoding_then_normalizing(case):
    """read_rows builds the rows of an all-static event straight from the JSON (one generated function decodes
    and maps). The reference is the generic path: Decoder._decode_args' loop over converters, then normalize of
    the decoded logs. Same rows in the same order (markets by every rule, fills through the tx rule), same
    rejections with the same reasons, and the unknown metric hashes are exactly those the decoded arguments name
    that the registry lacks."""
    from orderbook_pipelines.chain.normalize import _direct_builder, _plan, read_rows

    spec, address, registry, logs = case
    dec = Decoder.__new__(Decoder)  # one configured event, built from the drawn spec rather than a config file
    dec.address_sources, dec.specs = {address: "s"}, {("s", spec.topic0): spec}
    if not any(p.type == "bool" for p in (*spec.indexed, *spec.data)):  # bools take the generic path
        assert _direct_builder(spec, _plan(spec.mapping)) is not None

    def order_markets(keys: set[str]) -> dict[str, int]:
        return {k: 11 for k in keys if k.endswith("1")}

    decoded, want_rejected = dec.decode_all(logs)
    want_rows = normalize(decoded, registry, 31337, order_markets)
    rule = spec.mapping.market
    want_unknown = set()
    if rule.startswith("metric_hash:"):
        arg = rule.split(":", 1)[1]
        want_unknown = {str(d.args[arg]).lower() for d in decoded} - registry.by_metric_hash.keys()

    got = read_rows(dec, logs, registry, 31337, order_markets)
    assert got.rows == want_rows
    assert [(r.pos, r.reason) for r in got.rejected] == [(r.pos, r.reason) for r in want_rejected]
    assert set(got.unknown_metric_hashes) == want_unknown
    assert set(got.unknown_metric_hashes.values()) <= {"s"}
