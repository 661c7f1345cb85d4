// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title The part of EIP-3009 (transfer with authorization) the escrow relies on, as USDC implements it.
interface IERC3009 {
    /// @notice Moves `value` from `from` to `to` (who must be the caller) against `from`'s signed authorization.
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external;

    /// @notice Whether `authorizer` has used or cancelled the authorization `nonce`.
    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);
}
