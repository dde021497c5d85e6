// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title AluminumOrderBook (generation 2, "Aluminum V1")
/// @notice Self-contained single-market order book: the market is this
///         contract's address. Price-time priority matching; prices and sizes
///         are 1e6 fixed point, price tick 1e4 (0.01).
/// @dev Same engine structure as gen1 OrderBookLib: per side a sorted doubly
///      linked list of price levels (best first), per level a FIFO doubly
///      linked list of orders. Price 0 / id 0 are "none" sentinels.
contract AluminumOrderBook {
    uint8 internal constant BUY = 0;
    uint8 internal constant SELL = 1;

    uint8 internal constant STATUS_NONE = 0;
    uint8 internal constant STATUS_OPEN = 1;
    uint8 internal constant STATUS_FILLED = 2;
    uint8 internal constant STATUS_CANCELLED = 3;

    /// @notice Price granularity: 1e4 in 1e6 fixed point (0.01).
    uint256 public constant TICK_SIZE = 1e4;

    event OrderPlaced(
        bytes32 indexed orderId, address indexed user, uint8 side, uint256 size, uint256 price, uint256 timestamp
    );
    event OrderCancelled(bytes32 indexed orderId, address indexed user, uint256 timestamp);
    event OrderFilled(
        bytes32 indexed orderId,
        address indexed taker,
        address indexed maker,
        uint256 size,
        uint256 price,
        uint256 timestamp
    );
    event TradeExecuted(address indexed buyer, address indexed seller, uint256 size, uint256 price, uint256 timestamp);

    error InvalidSide();
    error ZeroSize();
    error InvalidPrice();
    error NotOrderOwner();
    error OrderNotOpen();

    struct Order {
        address user;
        uint8 side;
        uint8 status;
        bool isMarket;
        uint256 price;
        uint256 size;
        uint256 filled;
        bytes32 prev; // toward the head (older) of the level's FIFO
        bytes32 next; // toward the tail (newer) of the level's FIFO
    }

    struct Level {
        uint256 totalSize;
        uint256 orderCount; // a level exists iff orderCount > 0
        bytes32 head;
        bytes32 tail;
        uint256 better; // neighbouring level price closer to the top of book (0 = none)
        uint256 worse; // neighbouring level price further from the top of book (0 = none)
    }

    struct Side {
        uint256 best; // 0 when empty
        mapping(uint256 => Level) levels;
    }

    string public metricId;
    /// @notice Global counter mixed into order ids.
    uint256 public nonce;

    mapping(bytes32 => Order) internal orders;
    Side[2] internal sides;

    constructor(string memory metricId_) {
        metricId = metricId_;
    }

    // ------------------------------------------------------------------
    // Trading
    // ------------------------------------------------------------------

    /// @notice Place a limit order. Emits OrderPlaced first, then the match
    ///         events; the unfilled remainder rests on the book.
    function placeLimitOrder(uint8 side, uint256 size, uint256 price) external returns (bytes32 orderId) {
        if (side > SELL) revert InvalidSide();
        if (size == 0) revert ZeroSize();
        if (price == 0 || price % TICK_SIZE != 0) revert InvalidPrice();

        orderId = _newOrder(side, price, size, false);
        emit OrderPlaced(orderId, msg.sender, side, size, price, block.timestamp);

        uint256 filled = _match(orderId, side, false, size, price);
        Order storage o = orders[orderId];
        o.filled = filled;
        if (filled == size) {
            o.status = STATUS_FILLED;
        } else {
            _insert(orderId, side, price, size - filled);
        }
    }

    /// @notice Place a market order. Emits the match events first and
    ///         OrderPlaced (price 0) last; any unfilled remainder is dropped.
    function placeMarketOrder(uint8 side, uint256 size) external returns (bytes32 orderId) {
        if (side > SELL) revert InvalidSide();
        if (size == 0) revert ZeroSize();

        orderId = _newOrder(side, 0, size, true);
        uint256 filled = _match(orderId, side, true, size, 0);
        Order storage o = orders[orderId];
        o.filled = filled;
        o.status = filled == size ? STATUS_FILLED : STATUS_CANCELLED;

        emit OrderPlaced(orderId, msg.sender, side, size, 0, block.timestamp);
    }

    /// @notice Cancel an open (resting) order. Only the order's owner.
    function cancelOrder(bytes32 orderId) external {
        Order storage o = orders[orderId];
        if (o.user != msg.sender) revert NotOrderOwner();
        if (o.status != STATUS_OPEN) revert OrderNotOpen();

        uint256 price = o.price;
        Side storage s = sides[o.side];
        Level storage lvl = s.levels[price];
        lvl.totalSize -= o.size - o.filled;
        _unlinkOrder(lvl, orderId);
        o.status = STATUS_CANCELLED;
        if (lvl.orderCount == 0) _removeLevel(s, price);

        emit OrderCancelled(orderId, msg.sender, block.timestamp);
    }

    // ------------------------------------------------------------------
    // Views
    // ------------------------------------------------------------------

    function getOrder(bytes32 orderId)
        external
        view
        returns (address user, uint8 side, uint256 price, uint256 size, uint256 filled, uint8 status, bool isMarket)
    {
        Order storage o = orders[orderId];
        return (o.user, o.side, o.price, o.size, o.filled, o.status, o.isMarket);
    }

    /// @notice Highest bid price, 0 when there are no bids.
    function bestBid() external view returns (uint256) {
        return sides[BUY].best;
    }

    /// @notice Lowest ask price, 0 when there are no asks.
    function bestAsk() external view returns (uint256) {
        return sides[SELL].best;
    }

    /// @notice Up to `n` price levels of `side`, best first.
    function getLevels(uint8 side, uint256 n)
        external
        view
        returns (uint256[] memory prices, uint256[] memory quantities, uint256[] memory orderCounts)
    {
        if (side > SELL) revert InvalidSide();
        Side storage s = sides[side];
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
            quantities[i] = lvl.totalSize;
            orderCounts[i] = lvl.orderCount;
            p = lvl.worse;
        }
    }

    // ------------------------------------------------------------------
    // Internals
    // ------------------------------------------------------------------

    function _newOrder(uint8 side, uint256 price, uint256 size, bool isMarket) private returns (bytes32 orderId) {
        orderId = keccak256(abi.encode(address(this), msg.sender, nonce++));
        Order storage o = orders[orderId];
        o.user = msg.sender;
        o.side = side;
        o.status = STATUS_OPEN;
        o.isMarket = isMarket;
        o.price = price;
        o.size = size;
    }

    /// @dev Match taker `takerId` against the opposite side; returns the filled size.
    function _match(bytes32 takerId, uint8 side, bool isMarket, uint256 size, uint256 limitPrice)
        private
        returns (uint256 filled)
    {
        Side storage opp = sides[side == BUY ? SELL : BUY];
        uint256 remaining = size;

        uint256 levelPrice = opp.best;
        while (remaining > 0 && levelPrice != 0) {
            if (!isMarket && (side == BUY ? levelPrice > limitPrice : levelPrice < limitPrice)) break;
            Level storage lvl = opp.levels[levelPrice];
            remaining = _matchLevel(lvl, levelPrice, takerId, side, remaining);
            if (lvl.orderCount != 0) break; // taker exhausted inside this level
            uint256 nextPrice = lvl.worse;
            _removeLevel(opp, levelPrice);
            levelPrice = nextPrice;
        }
        filled = size - remaining;
    }

    /// @dev Match against one price level, oldest order first; returns the taker's remaining size.
    function _matchLevel(Level storage lvl, uint256 price, bytes32 takerId, uint8 side, uint256 remaining)
        private
        returns (uint256)
    {
        bytes32 makerId = lvl.head;
        while (remaining > 0 && makerId != bytes32(0)) {
            Order storage m = orders[makerId];
            uint256 makerFilled = m.filled;
            uint256 makerLeft = m.size - makerFilled;
            uint256 q = remaining < makerLeft ? remaining : makerLeft;
            remaining -= q;
            m.filled = makerFilled + q;
            lvl.totalSize -= q;

            _emitFill(takerId, makerId, m.user, side, q, price);

            if (q == makerLeft) {
                bytes32 nextId = m.next;
                _unlinkOrder(lvl, makerId);
                m.status = STATUS_FILLED;
                makerId = nextId;
            }
        }
        return remaining;
    }

    function _emitFill(bytes32 takerId, bytes32 makerId, address maker, uint8 side, uint256 q, uint256 price) private {
        address taker = msg.sender;
        if (side == BUY) emit TradeExecuted(taker, maker, q, price, block.timestamp);
        else emit TradeExecuted(maker, taker, q, price, block.timestamp);
        emit OrderFilled(takerId, taker, maker, q, price, block.timestamp);
        emit OrderFilled(makerId, maker, taker, q, price, block.timestamp);
    }

    /// @dev Append a resting order to the tail of its level, creating the
    ///      level in sorted position if needed.
    function _insert(bytes32 orderId, uint8 side, uint256 price, uint256 remaining) private {
        Side storage s = sides[side];
        Level storage lvl = s.levels[price];
        if (lvl.orderCount == 0) {
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
        bytes32 tail = lvl.tail;
        Order storage o = orders[orderId];
        o.prev = tail;
        o.next = bytes32(0);
        if (tail == bytes32(0)) lvl.head = orderId;
        else orders[tail].next = orderId;
        lvl.tail = orderId;
        lvl.orderCount += 1;
        lvl.totalSize += remaining;
    }

    function _unlinkOrder(Level storage lvl, bytes32 orderId) private {
        Order storage o = orders[orderId];
        bytes32 prev = o.prev;
        bytes32 next = o.next;
        if (prev == bytes32(0)) lvl.head = next;
        else orders[prev].next = next;
        if (next == bytes32(0)) lvl.tail = prev;
        else orders[next].prev = prev;
        o.prev = bytes32(0);
        o.next = bytes32(0);
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
