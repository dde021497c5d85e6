// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {OrderRouter} from "./OrderRouter.sol";

/// @title MultiMarketCaller (generation 1, reference batcher)
/// @notice Places and cancels router orders of several markets in ONE transaction, as a multicall, an
///         aggregator or a market maker's requote does. The router sees this contract as `msg.sender`, so it
///         is the trader of every order it places and the only one that may cancel them.
///
///         `batch(cancelsBefore, places, cancelsAfter)` runs, in this order and all in one call:
///           1. `cancelOrder(id)` for each id of `cancelsBefore`;
///           2. `placeOrder(...)` for each entry of `places` (their router ids are returned, in order);
///           3. `cancelOrder(id)` for each id of `cancelsAfter` (may name orders placed in step 2).
///         Any failing router call reverts the whole batch. Only the deployer may call it.
contract MultiMarketCaller {
    struct Placement {
        string metricId;
        uint8 orderType;
        uint8 side;
        uint256 quantity;
        uint256 price;
    }

    error NotOwner();

    OrderRouter public immutable router;
    address public immutable owner;

    constructor(OrderRouter router_) {
        router = router_;
        owner = msg.sender;
    }

    function batch(uint256[] calldata cancelsBefore, Placement[] calldata places, uint256[] calldata cancelsAfter)
        external
        returns (uint256[] memory orderIds)
    {
        if (msg.sender != owner) revert NotOwner();
        for (uint256 i; i < cancelsBefore.length; ++i) {
            router.cancelOrder(cancelsBefore[i]);
        }
        orderIds = new uint256[](places.length);
        for (uint256 i; i < places.length; ++i) {
            Placement calldata p = places[i];
            orderIds[i] = router.placeOrder(p.metricId, p.orderType, p.side, p.quantity, p.price);
        }
        for (uint256 i; i < cancelsAfter.length; ++i) {
            router.cancelOrder(cancelsAfter[i]);
        }
    }
}
