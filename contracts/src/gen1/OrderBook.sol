// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {OrderBookLib, Fill} from "./OrderBookLib.sol";

/// @title OrderBook (generation 1)
/// @notice One book per market. Only the OrderRouter that deployed/registered
///         it may place or cancel orders. Matching (price-time priority) and
///         the book events (OrderAdded / OrderMatched / OrderRemoved) live in
///         OrderBookLib and are logged with this contract's address.
contract OrderBook {
    using OrderBookLib for OrderBookLib.Book;

    uint8 internal constant BUY = 0;
    uint8 internal constant SELL = 1;
    uint8 internal constant MARKET = 0;
    uint8 internal constant LIMIT = 1;

    error NotRouter();
    error InvalidSide();
    error InvalidOrderType();
    error ZeroQuantity();
    error InvalidPrice();

    string public metricId;
    address public immutable router;

    OrderBookLib.Book internal book;

    modifier onlyRouter() {
        if (msg.sender != router) revert NotRouter();
        _;
    }

    constructor(string memory metricId_, address router_) {
        metricId = metricId_;
        router = router_;
    }

    /// @notice Place an order for `trader`. Price must be 0 for market orders.
    /// @return bookOrderId book-local id (sequential from 1) assigned to this order
    /// @return fills       makers matched, in priority order
    function place(
        address trader,
        uint256 routerOrderId,
        uint8 side,
        uint8 orderType,
        uint256 quantity,
        uint256 price
    ) external onlyRouter returns (uint256 bookOrderId, Fill[] memory fills) {
        if (side > SELL) revert InvalidSide();
        if (orderType > LIMIT) revert InvalidOrderType();
        if (quantity == 0) revert ZeroQuantity();
        bool isMarket = orderType == MARKET;
        if (isMarket ? price != 0 : price == 0) revert InvalidPrice();
        (bookOrderId, fills,) = book.place(trader, routerOrderId, side, isMarket, quantity, price);
    }

    /// @notice Cancel a resting order; returns its unfilled quantity.
    function cancel(uint256 bookOrderId) external onlyRouter returns (uint256 remaining) {
        remaining = book.cancel(bookOrderId);
    }

    /// @notice Highest bid price, 0 when there are no bids.
    function bestBid() external view returns (uint256) {
        return book.bestPrice(BUY);
    }

    /// @notice Lowest ask price, 0 when there are no asks.
    function bestAsk() external view returns (uint256) {
        return book.bestPrice(SELL);
    }

    /// @notice Up to `n` price levels of `side`, best first.
    function getLevels(uint8 side, uint256 n)
        external
        view
        returns (uint256[] memory prices, uint256[] memory quantities, uint256[] memory orderCounts)
    {
        if (side > SELL) revert InvalidSide();
        return book.levels(side, n);
    }

    function getOrder(uint256 bookOrderId)
        external
        view
        returns (address trader, uint256 routerOrderId, uint8 side, uint256 price, uint256 remaining, bool active)
    {
        OrderBookLib.Order storage o = book.orders[bookOrderId];
        return (o.trader, o.routerOrderId, o.side, o.price, o.remaining, o.active);
    }
}
