// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title Hearth provider registry: where providers say who they are (a DID) and where they answer.
/// @notice A provider's wallet calls `register(did, endpoint)` to list itself (and again to change either
/// value) and `leave()` to be delisted. Anyone can page through the listed providers or read one by wallet.
/// No stake, no owner: the registry only records what each wallet says. Whether a wallet really speaks for
/// the DID it names is checked off-chain (the DID's signed offer must name the same wallet and endpoint), so
/// two wallets naming one DID are both stored.
/// @dev Providers are kept in an array of wallets with a 1-based index per wallet, so `leave` is O(1)
/// (swap-and-pop) and a page is O(page). A `register` with exactly the stored values changes nothing and
/// emits nothing.
contract HearthRegistry {
    /// @notice The longest DID, in bytes.
    uint256 public constant MAX_DID_BYTES = 256;
    /// @notice The longest endpoint URL, in bytes.
    uint256 public constant MAX_ENDPOINT_BYTES = 2048;
    /// @notice The most providers one `providers` call returns.
    uint256 public constant MAX_PAGE = 100;

    /// @dev since, updated and index share one slot.
    struct Record {
        uint64 since; // block timestamp of the registration
        uint64 updated; // block timestamp of the last change (= since until the first update)
        uint64 index; // 1-based position in `_wallets`; 0: not registered
        string did;
        string endpoint;
    }

    mapping(address wallet => Record) private _records;
    address[] private _wallets;

    event Registered(address indexed wallet, string did, string endpoint);
    event Updated(address indexed wallet, string did, string endpoint);
    event Left(address indexed wallet, string did, string endpoint);

    /// @notice The DID is empty or longer than MAX_DID_BYTES.
    error DidLength(uint256 length);
    /// @notice The endpoint is empty or longer than MAX_ENDPOINT_BYTES.
    error EndpointLength(uint256 length);
    /// @notice The wallet has no record to leave.
    error NotRegistered(address wallet);
    /// @notice A page larger than MAX_PAGE was asked for.
    error PageTooLarge(uint256 limit, uint256 max);

    /// @notice Lists the calling wallet with `did` and `endpoint`, or changes its listing to them.
    function register(string calldata did, string calldata endpoint) external {
        uint256 didLength = bytes(did).length;
        if (didLength == 0 || didLength > MAX_DID_BYTES) revert DidLength(didLength);
        uint256 endpointLength = bytes(endpoint).length;
        if (endpointLength == 0 || endpointLength > MAX_ENDPOINT_BYTES) revert EndpointLength(endpointLength);
        Record storage record = _records[msg.sender];
        uint64 now_ = uint64(block.timestamp);
        if (record.index == 0) {
            _wallets.push(msg.sender);
            record.index = uint64(_wallets.length);
            record.since = now_;
            record.updated = now_;
            record.did = did;
            record.endpoint = endpoint;
            emit Registered(msg.sender, did, endpoint);
            return;
        }
        bool didChanged = keccak256(bytes(record.did)) != keccak256(bytes(did));
        bool endpointChanged = keccak256(bytes(record.endpoint)) != keccak256(bytes(endpoint));
        if (!didChanged && !endpointChanged) return;
        if (didChanged) record.did = did;
        if (endpointChanged) record.endpoint = endpoint;
        record.updated = now_;
        emit Updated(msg.sender, did, endpoint);
    }

    /// @notice Delists the calling wallet.
    function leave() external {
        Record storage record = _records[msg.sender];
        uint256 index = record.index;
        if (index == 0) revert NotRegistered(msg.sender);
        emit Left(msg.sender, record.did, record.endpoint);
        uint256 last = _wallets.length;
        if (index != last) {
            address moved = _wallets[last - 1];
            _wallets[index - 1] = moved;
            _records[moved].index = uint64(index);
        }
        _wallets.pop();
        delete _records[msg.sender];
    }

    /// @notice How many wallets are registered.
    function providerCount() external view returns (uint256) {
        return _wallets.length;
    }

    /// @notice Up to `limit` (at most MAX_PAGE) providers from position `start`; empty past the end.
    /// @dev Positions move when a provider leaves (the last one takes its place): read every page at one
    /// block to see one consistent list.
    function providers(uint256 start, uint256 limit)
        external
        view
        returns (address[] memory wallets, string[] memory dids, string[] memory endpoints)
    {
        if (limit > MAX_PAGE) revert PageTooLarge(limit, MAX_PAGE);
        uint256 count = _wallets.length;
        uint256 n = start >= count ? 0 : (count - start < limit ? count - start : limit);
        wallets = new address[](n);
        dids = new string[](n);
        endpoints = new string[](n);
        for (uint256 i = 0; i < n; ++i) {
            address wallet = _wallets[start + i];
            Record storage record = _records[wallet];
            wallets[i] = wallet;
            dids[i] = record.did;
            endpoints[i] = record.endpoint;
        }
    }

    /// @notice The record of `wallet`; `registered` is false (and the rest empty) when it has none.
    function provider(address wallet)
        external
        view
        returns (bool registered, string memory did, string memory endpoint, uint64 since, uint64 updated)
    {
        Record storage record = _records[wallet];
        return (record.index != 0, record.did, record.endpoint, record.since, record.updated);
    }
}
