// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @notice One trade against a resting (maker) order, as reported by OrderBook.place.
struct Fill {
    uint256 makerRouterOrderId;
    address maker;
    uint256 quantity;
    uint256 price;
}

/// @title OrderBookLib (generation 1)
/// @notice Price-time priority limit order book kept in the storage of the
///         contract that uses it. All functions are `internal`, so they are
///         inlined into the caller and the events below are logged with the
///         caller's (the OrderBook's) address.
/// @dev Layout: per side, a sorted doubly linked list of price levels (best
///      price first); per level, a FIFO doubly linked list of orders.
///      Order ids are book-local, sequential from 1. Price 0 and id 0 are
///      used as "none" sentinels (limit prices are always > 0).
library OrderBookLib {
    uint8 internal constant BUY = 0;
    uint8 internal constant SELL = 1;

    event OrderAdded(uint256 indexed orderId, uint256 price, uint8 side, uint256 quantity);
    event OrderMatched(
        uint256 indexed buyOrderId,
        uint256 indexed sellOrderId,
        uint256 price,
        uint256 quantity,
        address buyer,
        address seller
    );
    event OrderRemoved(uint256 indexed orderId, uint256 price, uint8 side);

    error OrderNotActive(uint256 orderId);

    struct Order {
        address trader;
        uint8 side;
        bool active;
        uint256 routerOrderId;
        uint256 price;
        uint256 remaining;
        uint256 prev; // toward the head (older) of the level's FIFO
        uint256 next; // toward the tail (newer) of the level's FIFO
    }

    struct Level {
        uint256 totalQuantity;
        uint256 orderCount; // a level exists iff orderCount > 0
        uint256 head; // oldest order id
        uint256 tail; // newest order id
        uint256 better; // neighbouring level price closer to the top of book (0 = none)
        uint256 worse; // neighbouring level price further from the top of book (0 = none)
    }

    struct Side {
        uint256 best; // best level price, 0 when the side is empty
        mapping(uint256 => Level) levels;
    }

    struct Book {
        uint256 lastOrderId;
        mapping(uint256 => Order) orders;
        Side[2] sides;
    }

    // ------------------------------------------------------------------
    // Mutations
    // ------------------------------------------------------------------

    /// @notice Match an incoming order against the opposite side and, for a
    ///         limit order, rest its remainder.
    /// @return orderId   book id assigned to the incoming order (also for market orders)
    /// @return fills     one entry per maker matched, in priority order
    /// @return remaining unfilled quantity (resting for limit, dropped for market)
    function place(
        Book storage book,
        address trader,
        uint256 routerOrderId,
        uint8 side,
        bool isMarket,
        uint256 quantity,
        uint256 price
    ) internal returns (uint256 orderId, Fill[] memory fills, uint256 remaining) {
        orderId = ++book.lastOrderId;
        Order storage taker = book.orders[orderId];
        taker.trader = trader;
        taker.side = side;
        taker.routerOrderId = routerOrderId;
        taker.price = price;

        (fills, remaining) = _match(book, orderId, trader, side, isMarket, quantity, price);

        if (!isMarket && remaining > 0) {
            taker.remaining = remaining;
            taker.active = true;
            _insert(book, orderId, side, price);
            emit OrderAdded(orderId, price, side, remaining);
        }
    }

    /// @notice Remove an active resting order. Returns its unfilled quantity.
    function cancel(Book storage book, uint256 orderId) internal returns (uint256 remaining) {
        Order storage o = book.orders[orderId];
        if (!o.active) revert OrderNotActive(orderId);
        uint256 price = o.price;
        uint8 side = o.side;
        remaining = o.remaining;

        Side storage s = book.sides[side];
        Level storage lvl = s.levels[price];
        lvl.totalQuantity -= remaining;
        _unlinkOrder(book, lvl, orderId);
        o.active = false;
        o.remaining = 0;
        if (lvl.orderCount == 0) _removeLevel(s, price);

        emit OrderRemoved(orderId, price, side);
    }

    // ------------------------------------------------------------------
    // Views
    // ------------------------------------------------------------------

    function bestPrice(Book storage book, uint8 side) internal view returns (uint256) {
        return book.sides[side].best;
    }

    function levels(Book storage book, uint8 side, uint256 n)
        internal
        view
        returns (uint256[] memory prices, uint256[] memory quantities, uint256[] memory orderCounts)
    {
        Side storage s = book.sides[side];
        uint256 count;
        uint256 p = s.best;
        while (p != 0 && count < n) {
            ++count;
            p = s.levels[p].worse;
        }
        prices = new uint256[](count);
        quantities = new uint256[](count);
        orderCounts = new uint256[](count);
        p = s.best;
        for (uint256 i; i < count; ++i) {
            Level storage lvl = s.levels[p];
            prices[i] = p;
            quantities[i] = lvl.totalQuantity;
            orderCounts[i] = lvl.orderCount;
            p = lvl.worse;
        }
    }

    // ------------------------------------------------------------------
    // Internals
    // ------------------------------------------------------------------

    /// @dev Working state of the incoming order while it is being matched.
    struct Taker {
        uint256 orderId;
        address trader;
        uint8 side;
        uint256 remaining;
        Fill[] fills;
        uint256 nFills;
    }

    function _match(
        Book storage book,
        uint256 takerId,
        address trader,
        uint8 side,
        bool isMarket,
        uint256 quantity,
        uint256 limitPrice
    ) private returns (Fill[] memory fills, uint256 remaining) {
        Taker memory t = Taker({
            orderId: takerId,
            trader: trader,
            side: side,
            remaining: quantity,
            fills: new Fill[](4),
            nFills: 0
        });
        Side storage opp = book.sides[side == BUY ? SELL : BUY];

        uint256 levelPrice = opp.best;
        while (t.remaining > 0 && levelPrice != 0) {
            if (!isMarket && (side == BUY ? levelPrice > limitPrice : levelPrice < limitPrice)) break;
            Level storage lvl = opp.levels[levelPrice];
            _matchLevel(book, lvl, levelPrice, t);
            if (lvl.orderCount != 0) break; // taker exhausted inside this level
            uint256 nextPrice = lvl.worse;
            _removeLevel(opp, levelPrice);
            levelPrice = nextPrice;
        }

        fills = t.fills;
        uint256 n = t.nFills;
        assembly ("memory-safe") {
            mstore(fills, n)
        }
        remaining = t.remaining;
    }

    /// @dev Match the taker against one price level, oldest order first.
    function _matchLevel(Book storage book, Level storage lvl, uint256 price, Taker memory t) private {
        uint8 makerSide = t.side == BUY ? SELL : BUY;
        uint256 makerId = lvl.head;
        while (t.remaining > 0 && makerId != 0) {
            Order storage m = book.orders[makerId];
            uint256 makerLeft = m.remaining;
            uint256 q = t.remaining < makerLeft ? t.remaining : makerLeft;
            t.remaining -= q;
            m.remaining = makerLeft - q;
            lvl.totalQuantity -= q;

            address maker = m.trader;
            if (t.side == BUY) emit OrderMatched(t.orderId, makerId, price, q, t.trader, maker);
            else emit OrderMatched(makerId, t.orderId, price, q, maker, t.trader);

            if (t.nFills == t.fills.length) t.fills = _grow(t.fills);
            t.fills[t.nFills++] = Fill({makerRouterOrderId: m.routerOrderId, maker: maker, quantity: q, price: price});

            if (q == makerLeft) {
                uint256 nextId = m.next;
                _unlinkOrder(book, lvl, makerId);
                m.active = false;
                emit OrderRemoved(makerId, price, makerSide);
                makerId = nextId;
            }
        }
    }

    function _grow(Fill[] memory a) private pure returns (Fill[] memory b) {
        b = new Fill[](a.length * 2);
        for (uint256 i; i < a.length; ++i) b[i] = a[i];
    }

    /// @dev Append an order (already populated) to the tail of its price level,
    ///      creating the level in sorted position if needed.
    function _insert(Book storage book, uint256 orderId, uint8 side, uint256 price) private {
        Side storage s = book.sides[side];
        Level storage lvl = s.levels[price];
        if (lvl.orderCount == 0) {
            // Walk from the top of book to the first level that is not better than `price`.
            uint256 better;
            uint256 cur = s.best;
            while (cur != 0 && (side == BUY ? cur > price : cur < price)) {
                better = cur;
                cur = s.levels[cur].worse;
            }
            lvl.better = better;
            lvl.worse = cur;
            if (better == 0) s.best = price;
            else s.levels[better].worse = price;
            if (cur != 0) s.levels[cur].better = price;
        }
        uint256 tail = lvl.tail;
        Order storage o = book.orders[orderId];
        o.prev = tail;
        o.next = 0;
        if (tail == 0) lvl.head = orderId;
        else book.orders[tail].next = orderId;
        lvl.tail = orderId;
        lvl.orderCount += 1;
        lvl.totalQuantity += o.remaining;
    }

    function _unlinkOrder(Book storage book, Level storage lvl, uint256 orderId) private {
        Order storage o = book.orders[orderId];
        uint256 prev = o.prev;
        uint256 next = o.next;
        if (prev == 0) lvl.head = next;
        else book.orders[prev].next = next;
        if (next == 0) lvl.tail = prev;
        else book.orders[next].prev = prev;
        o.prev = 0;
        o.next = 0;
        lvl.orderCount -= 1;
    }

    function _removeLevel(Side storage s, uint256 price) private {
        Level storage lvl = s.levels[price];
        uint256 better = lvl.better;
        uint256 worse = lvl.worse;
        if (better == 0) s.best = worse;
        else s.levels[better].worse = worse;
        if (worse != 0) s.levels[worse].better = better;
        delete s.levels[price];
    }
}
