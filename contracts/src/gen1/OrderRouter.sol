// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {OrderBook} from "./OrderBook.sol";
import {Fill} from "./OrderBookLib.sol";

/// @title OrderRouter (generation 1)
/// @notice Entry point for traders. Holds the global order registry (router
///         order ids, sequential from 1) and forwards orders to the per-market
///         OrderBook registered for a metric id.
contract OrderRouter {
    uint8 internal constant BUY = 0;
    uint8 internal constant SELL = 1;
    uint8 internal constant MARKET = 0;
    uint8 internal constant LIMIT = 1;

    uint8 internal constant STATUS_NONE = 0;
    uint8 internal constant STATUS_OPEN = 1;
    uint8 internal constant STATUS_FILLED = 2;
    uint8 internal constant STATUS_CANCELLED = 3;

    /// @notice Price granularity: 1e16 in 1e18 fixed point (0.01).
    uint256 public constant TICK_SIZE = 1e16;

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

    error NotOwner();
    error EmptyMetricId();
    error MarketAlreadyRegistered();
    error InvalidBook();
    error UnknownMarket();
    error InvalidOrderType();
    error InvalidSide();
    error ZeroQuantity();
    error InvalidPrice();
    error NotOrderTrader();
    error OrderNotOpen();

    struct Order {
        address trader;
        uint8 orderType;
        uint8 side;
        uint8 status;
        address book;
        bytes32 metricHash;
        uint256 price;
        uint256 quantity;
        uint256 filled;
        uint256 bookOrderId;
    }

    address public immutable owner;
    /// @notice Id that the next placed order will receive (starts at 1).
    uint256 public nextOrderId = 1;

    mapping(bytes32 => address) internal books; // keccak256(bytes(metricId)) => book
    mapping(uint256 => Order) internal orders;

    constructor() {
        owner = msg.sender;
    }

    function registerMarket(string calldata metricId, address book) external {
        if (msg.sender != owner) revert NotOwner();
        if (bytes(metricId).length == 0) revert EmptyMetricId();
        if (book == address(0) || book.code.length == 0) revert InvalidBook();
        bytes32 h = keccak256(bytes(metricId));
        if (books[h] != address(0)) revert MarketAlreadyRegistered();
        books[h] = book;
    }

    function placeOrder(string calldata metricId, uint8 orderType, uint8 side, uint256 quantity, uint256 price)
        external
        returns (uint256 orderId)
    {
        bytes32 h = keccak256(bytes(metricId));
        address book = books[h];
        if (book == address(0)) revert UnknownMarket();
        if (orderType > LIMIT) revert InvalidOrderType();
        if (side > SELL) revert InvalidSide();
        if (quantity == 0) revert ZeroQuantity();
        if (orderType == MARKET) {
            if (price != 0) revert InvalidPrice();
        } else if (price == 0 || price % TICK_SIZE != 0) {
            revert InvalidPrice();
        }

        orderId = nextOrderId++;
        Order storage o = orders[orderId];
        o.trader = msg.sender;
        o.orderType = orderType;
        o.side = side;
        o.status = STATUS_OPEN;
        o.book = book;
        o.metricHash = h;
        o.price = price;
        o.quantity = quantity;

        emit OrderPlaced(orderId, msg.sender, metricId, orderType, side, quantity, price);

        (uint256 bookOrderId, Fill[] memory fills) =
            OrderBook(book).place(msg.sender, orderId, side, orderType, quantity, price);
        o.bookOrderId = bookOrderId;

        uint256 filled;
        for (uint256 i; i < fills.length; ++i) {
            Fill memory f = fills[i];
            Order storage m = orders[f.makerRouterOrderId];
            uint256 mFilled = m.filled + f.quantity;
            m.filled = mFilled;
            if (mFilled == m.quantity) m.status = STATUS_FILLED;
            filled += f.quantity;
            emit OrderExecuted(f.makerRouterOrderId, f.maker, f.quantity, f.price, block.timestamp);
            emit OrderExecuted(orderId, msg.sender, f.quantity, f.price, block.timestamp);
        }
        o.filled = filled;

        if (filled == quantity) {
            o.status = STATUS_FILLED;
        } else if (orderType == MARKET) {
            o.status = STATUS_CANCELLED;
            emit OrderCancelled(orderId, msg.sender, quantity - filled);
        }
    }

    function cancelOrder(uint256 orderId) external {
        Order storage o = orders[orderId];
        if (o.trader != msg.sender) revert NotOrderTrader();
        if (o.status != STATUS_OPEN) revert OrderNotOpen();
        uint256 remaining = OrderBook(o.book).cancel(o.bookOrderId);
        o.status = STATUS_CANCELLED;
        emit OrderCancelled(orderId, msg.sender, remaining);
    }

    function getOrder(uint256 orderId)
        external
        view
        returns (
            address trader,
            bytes32 metricHash,
            address book,
            uint8 orderType,
            uint8 side,
            uint256 price,
            uint256 quantity,
            uint256 filled,
            uint8 status
        )
    {
        Order storage o = orders[orderId];
        return (o.trader, o.metricHash, o.book, o.orderType, o.side, o.price, o.quantity, o.filled, o.status);
    }

    function bookOf(string calldata metricId) external view returns (address) {
        return books[keccak256(bytes(metricId))];
    }

    function bookOrderIdOf(uint256 routerOrderId) external view returns (uint256) {
        return orders[routerOrderId].bookOrderId;
    }
}
