// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title EventSpammer (benchmarks only)
/// @notice Load generator for bench/: emits generation-1 OrderRouter-shaped events (same signatures, same
///         indexed layout) in bulk, so the indexer can be pointed at it with the OrderRouter ABI and the gen-1
///         event mapping. One call = one market (gen-1 OrderExecuted/OrderCancelled carry no market and take the
///         market of their order).
///
///         `burst(metricId, firstId, opens, mid, tick, unit)` emits, for i in [0, opens):
///           OrderPlaced(firstId+i): limit, side i%2, price mid -/+ (1 + (i/2)%50) ticks (bids below asks),
///                                   quantity unit * (2 + i%7), trader 0x…b0000 + i%64
///         and after every 4 opens: one OrderExecuted (half of the 2nd order of the group, at its price) and,
///         every 8 opens, one OrderCancelled (the 4th order of the group, its full remaining quantity).
///         Events per call: opens + opens/4 + opens/8.
contract EventSpammer {
    event OrderPlaced(
        uint256 indexed orderId,
        address indexed trader,
        string indexed metricId,
        uint8 orderType,
        uint8 side,
        uint256 quantity,
        uint256 price
    );
    event OrderExecuted(
        uint256 indexed orderId, address indexed trader, uint256 executedQuantity, uint256 executedPrice, uint256 timestamp
    );
    event OrderCancelled(uint256 indexed orderId, address indexed trader, uint256 remainingQuantity);

    function burst(string calldata metricId, uint256 firstId, uint256 opens, uint256 mid, uint256 tick, uint256 unit)
        external
    {
        bytes32 market = keccak256(bytes(metricId));
        for (uint256 i; i < opens; ++i) {
            (uint256 side, uint256 price, uint256 qty) = _order(i, mid, tick, unit);
            _placed(firstId + i, _trader(i), market, side, qty, price);
            if (i % 4 == 3) {
                // partial fill (half) of the group's 2nd order, at its price
                (, uint256 fPrice, uint256 fQty) = _order(i - 2, mid, tick, unit);
                _executed(firstId + i - 2, _trader(i - 2), fQty / 2, fPrice);
            }
            if (i % 8 == 7) {
                // cancel of the group's 4th order (never filled): its full quantity remains
                (,, uint256 cQty) = _order(i - 4, mid, tick, unit);
                _cancelled(firstId + i - 4, _trader(i - 4), cQty);
            }
        }
    }

    /// @notice Opens only, in many markets in one transaction (OrderPlaced names its market, so no fill or
    ///         cancel rides along): `perMarket` limit orders in each of `markets` (keccak256 of the metric ids),
    ///         ids from `firstId`, prices around `mids[k]` as in `burst`, order `seq` of a market being `salt + j`.
    function spread(bytes32[] calldata markets, uint256[] calldata mids, uint256 firstId, uint256 perMarket,
                    uint256 salt, uint256 tick, uint256 unit) external {
        for (uint256 k; k < markets.length; ++k) {
            _spreadOne(markets[k], mids[k], firstId + k * perMarket, perMarket, salt, tick, unit);
        }
    }

    function _spreadOne(bytes32 market, uint256 mid, uint256 firstId, uint256 n, uint256 salt, uint256 tick,
                        uint256 unit) internal {
        for (uint256 j; j < n; ++j) {
            (uint256 side, uint256 price, uint256 qty) = _order(salt + j, mid, tick, unit);
            _placed(firstId + j, _trader(firstId + j), market, side, qty, price);
        }
    }

    function _order(uint256 i, uint256 mid, uint256 tick, uint256 unit)
        internal
        pure
        returns (uint256 side, uint256 price, uint256 qty)
    {
        side = i & 1;
        uint256 off = (1 + ((i >> 1) % 50)) * tick;
        price = side == 0 ? mid - off : mid + off;
        qty = unit * (2 + (i % 7));
    }

    function _trader(uint256 i) internal pure returns (uint256) {
        return 0xb0000 + (i % 64);
    }

    function _placed(uint256 id, uint256 trader, bytes32 market, uint256 side, uint256 qty, uint256 price) internal {
        bytes32 t0 = OrderPlaced.selector;
        assembly {
            let p := mload(0x40)
            mstore(p, 1)
            mstore(add(p, 0x20), side)
            mstore(add(p, 0x40), qty)
            mstore(add(p, 0x60), price)
            log4(p, 0x80, t0, id, trader, market)
        }
    }

    function _executed(uint256 id, uint256 trader, uint256 qty, uint256 price) internal {
        bytes32 t0 = OrderExecuted.selector;
        uint256 ts = block.timestamp;
        assembly {
            let p := mload(0x40)
            mstore(p, qty)
            mstore(add(p, 0x20), price)
            mstore(add(p, 0x40), ts)
            log3(p, 0x60, t0, id, trader)
        }
    }

    function _cancelled(uint256 id, uint256 trader, uint256 qty) internal {
        bytes32 t0 = OrderCancelled.selector;
        assembly {
            let p := mload(0x40)
            mstore(p, qty)
            log3(p, 0x20, t0, id, trader)
        }
    }
}
